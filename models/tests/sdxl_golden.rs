//! SDXL against ComfyUI's own model code: `fixtures/sdxl/goldens.json` holds what ComfyUI
//! 0.8.0's SDXL text encoders, `encode_adm` and UNet compute from sakuga's demo SDXL
//! checkpoint (`make_sdxl_goldens.py` there; ComfyUI loads the file with strict key
//! checking, so the SGM layout is pinned too).

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use sakuga_models::demo::write_demo_sdxl_checkpoint;
use sakuga_models::diffusion::tokenizer::ClipTokenizer;
use sakuga_models::diffusion::{Checkpoint, SizeConditioning, TextConditioning};
use serde_json::Value;
use support::relative_error;

mod support;

fn goldens() -> Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/sdxl/goldens.json");
    serde_json::from_slice(&std::fs::read(path).expect("goldens.json")).expect("json")
}

fn tensor(v: &Value) -> Tensor {
    support::golden_tensor(v)
}

fn demo() -> (tempfile::TempDir, Checkpoint) {
    let dir = tempfile::tempdir().unwrap();
    let path = write_demo_sdxl_checkpoint(dir.path()).unwrap();
    let checkpoint = Checkpoint::open(&path).unwrap();
    (dir, checkpoint)
}

/// The architecture read from tensor shapes alone, as for a checkpoint from elsewhere.
fn inferred(config: &sakuga_models::diffusion::SdConfig) -> sakuga_models::diffusion::SdConfig {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bare.safetensors");
    let tensors = sakuga_models::demo::demo_checkpoint_tensors(config, 1).unwrap();
    sakuga_models::store::write_safetensors(&path, &tensors, &Default::default()).unwrap();
    Checkpoint::open(&path).unwrap().config().clone()
}

#[test]
fn sdxl_and_its_refiner_are_read_from_their_tensors() {
    use sakuga_models::diffusion::SdConfig;
    for preset in [SdConfig::demo_sdxl(), SdConfig::demo_sdxl_refiner()] {
        let read = inferred(&preset);
        assert_eq!(read.unet.levels, preset.unet.levels);
        assert_eq!(read.unet.adm_in_channels, preset.unet.adm_in_channels);
        assert_eq!(
            read.unet.cross_attention_dim,
            preset.unet.cross_attention_dim
        );
        assert_eq!(read.unet, preset.unet);
        assert!(read.unet.use_linear_projection);
        assert_eq!(read.clip, preset.clip);
        assert_eq!(read.clip_g, preset.clip_g);
        assert_eq!(read.vae.scaling_factor, 0.13025);
        assert_eq!(read.is_sdxl_refiner(), preset.is_sdxl_refiner());
    }
}

#[test]
fn text_encoders_and_y_match_comfyui() {
    let g = goldens();
    let (_dir, checkpoint) = demo();
    let tokens: Vec<u32> = ClipTokenizer::shared().encode_windows("a photo of", 49407)[0].clone();
    let want_tokens: Vec<u32> = g["tokens_l"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_u64().unwrap() as u32)
        .collect();
    assert_eq!(tokens, want_tokens, "the prompt tokenizes as ComfyUI's");
    let clip = checkpoint.load_clip(&[], &Device::Cpu, DType::F32).unwrap();
    assert!(clip.is_dual());
    let encoded = clip.encode_pair("a photo of", "a photo of").unwrap();
    let context_error = relative_error(&encoded.context, &tensor(&g["context"]));
    assert!(context_error < 1e-5, "context: {context_error:e}");
    let pooled = encoded.pooled.expect("OpenCLIP-G pools");
    let pooled_error = relative_error(&pooled, &tensor(&g["pooled_g"]));
    assert!(pooled_error < 1e-5, "pooled: {pooled_error:e}");

    let adm = &g["adm"];
    let size = |key: &str| adm[key].as_f64().unwrap();
    let conditioning = TextConditioning {
        pooled: Some(pooled),
        size: Some(SizeConditioning {
            width: size("width"),
            height: size("height"),
            crop_w: size("crop_w"),
            crop_h: size("crop_h"),
            target_width: size("target_width"),
            target_height: size("target_height"),
        }),
        ..TextConditioning::context(encoded.context)
    };
    let y = conditioning
        .sdxl_y(1600, false, false, (6, 8), &Device::Cpu)
        .unwrap();
    // ComfyUI embeds the sizes in f32; sakuga in f64, then rounds.
    let y_error = relative_error(&y, &tensor(&adm["y"]));
    assert!(y_error < 1e-5, "y: {y_error:e}");
}

#[test]
fn the_unet_matches_comfyui_with_context_and_y() {
    let g = goldens();
    let (_dir, checkpoint) = demo();
    let unet = checkpoint.load_unet(&[], &Device::Cpu, DType::F32).unwrap();
    assert!(unet.takes_y());
    let context = tensor(&g["context"]);
    let y = tensor(&g["adm"]["y"]);
    for case in ["unet", "unet_batch2"] {
        let case = &g[case];
        let x = tensor(&case["x"]);
        let batch = x.dim(0).unwrap();
        let t = case["timesteps"][0].as_f64().unwrap();
        let eps = unet
            .forward(
                &x,
                t,
                &context.repeat((batch, 1, 1)).unwrap(),
                Some(&y.repeat((batch, 1)).unwrap()),
            )
            .unwrap();
        let error = relative_error(&eps, &tensor(&case["eps"]));
        // Both run in f32; sin and cos of the raw timestep (hundreds of radians) already
        // differ in the last bits between libm and PyTorch, and the network amplifies that.
        assert!(error < 5e-4, "eps (batch {batch}): {error:e}");
    }
    let without_y = unet.forward(&tensor(&g["unet"]["x"]), 500.0, &context, None);
    assert!(without_y.is_err(), "an SDXL UNet refuses to run without y");
}

#[test]
fn the_refiner_demo_is_read_and_samples_with_its_aesthetic_score() {
    use sakuga_models::diffusion::{SampleParams, StepHooks, sample_latent};
    let dir = tempfile::tempdir().unwrap();
    let path = sakuga_models::demo::write_demo_sdxl_refiner_checkpoint(dir.path()).unwrap();
    let checkpoint = Checkpoint::open(&path).unwrap();
    assert!(checkpoint.config().is_sdxl_refiner());
    assert_eq!(checkpoint.config().unet.adm_in_channels, Some(64 + 5 * 256));
    let clip = checkpoint.load_clip(&[], &Device::Cpu, DType::F32).unwrap();
    let positive = clip.condition("a photo of").unwrap();
    assert_eq!(positive.context.dims(), &[1, 77, 64]);
    assert!(positive.pooled.is_some(), "the refiner's OpenCLIP-G pools");
    let unet = checkpoint.load_unet(&[], &Device::Cpu, DType::F32).unwrap();
    let latent = Tensor::zeros((1, 4, 6, 8), DType::F32, &Device::Cpu).unwrap();
    let run = |score: f64| {
        let mut scored = positive.clone();
        scored.aesthetic_score = Some(score);
        let params = SampleParams {
            steps: 2,
            cfg: 1.0,
            ..SampleParams::new(3)
        };
        sample_latent(
            &unet,
            std::slice::from_ref(&scored),
            std::slice::from_ref(&scored),
            &latent,
            &params,
            StepHooks::none(),
        )
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
    };
    assert!(run(6.0).iter().all(|v| v.is_finite()));
    assert_ne!(run(6.0), run(2.0), "the aesthetic score reaches the UNet");
}

#[test]
fn kohya_and_peft_sdxl_loras_patch_the_unet_and_both_text_encoders() {
    use std::collections::BTreeMap;
    use std::sync::Arc;

    use sakuga_models::diffusion::{AppliedLora, LoraFile};

    let (dir, checkpoint) = demo();
    let rank = 4;
    // The same factors in kohya's SDXL names (the UNet in LDM naming, CLIP-L as te1 and
    // OpenCLIP-G as te2 in transformers naming, whose q/k/v live fused in the checkpoint)
    // and in diffusers/PEFT names; both must patch the same weights the same way.
    let modules = [
        (
            "lora_unet_input_blocks_3_1_transformer_blocks_0_attn1_to_q",
            "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
            64,
            64,
        ),
        (
            "lora_te1_text_model_encoder_layers_0_self_attn_q_proj",
            "text_encoder.text_model.encoder.layers.0.self_attn.q_proj",
            32,
            32,
        ),
        (
            "lora_te2_text_model_encoder_layers_0_self_attn_k_proj",
            "text_encoder_2.text_model.encoder.layers.0.self_attn.k_proj",
            64,
            64,
        ),
    ];
    let write = |file: &str, peft: bool| {
        let mut tensors = BTreeMap::new();
        for (i, (kohya, diffusers, out_dim, in_dim)) in modules.into_iter().enumerate() {
            let seeded = |shape: (usize, usize), salt: f32| {
                let values: Vec<f32> = (0..shape.0 * shape.1)
                    .map(|k| ((k as f32 * 0.37 + salt + i as f32).sin()) * 0.5)
                    .collect();
                Tensor::from_vec(values, shape, &Device::Cpu).unwrap()
            };
            let (down, up) = (seeded((rank, in_dim), 0.1), seeded((out_dim, rank), 0.7));
            if peft {
                tensors.insert(format!("{diffusers}.lora_A.weight"), down);
                tensors.insert(format!("{diffusers}.lora_B.weight"), up);
            } else {
                tensors.insert(format!("{kohya}.lora_down.weight"), down);
                tensors.insert(format!("{kohya}.lora_up.weight"), up);
                let alpha = Tensor::new(&[rank as f32], &Device::Cpu).unwrap();
                tensors.insert(format!("{kohya}.alpha"), alpha);
            }
        }
        let path = dir.path().join(file);
        sakuga_models::store::write_safetensors(&path, &tensors, &Default::default()).unwrap();
        AppliedLora {
            lora: Arc::new(LoraFile::open(&path).unwrap()),
            strength_model: 1.0,
            strength_clip: 1.0,
        }
    };
    let (lora, peft) = (
        write("kohya.safetensors", false),
        write("peft.safetensors", true),
    );
    let encode = |loras: &[AppliedLora]| {
        let clip = checkpoint
            .load_clip(loras, &Device::Cpu, DType::F32)
            .unwrap();
        clip.encode_pair("a photo of", "a photo of").unwrap()
    };
    let (plain, patched) = (encode(&[]), encode(std::slice::from_ref(&lora)));
    let patched_by_peft = encode(std::slice::from_ref(&peft));
    assert!(relative_error(&patched_by_peft.context, &patched.context) < 1e-6);
    for (from, width, encoder) in [(0, 32, "CLIP-L"), (32, 64, "OpenCLIP-G")] {
        let part =
            |e: &sakuga_models::diffusion::Encoded| e.context.narrow(2, from, width).unwrap();
        assert!(
            relative_error(&part(&patched), &part(&plain)) > 1e-3,
            "{encoder} is patched"
        );
    }
    assert!(
        relative_error(
            patched.pooled.as_ref().unwrap(),
            plain.pooled.as_ref().unwrap()
        ) > 1e-3,
        "the pooled output follows OpenCLIP-G"
    );
    let g = goldens();
    let x = tensor(&g["unet"]["x"]);
    let (context, y) = (tensor(&g["context"]), tensor(&g["adm"]["y"]));
    let eps = |loras: &[AppliedLora]| {
        let unet = checkpoint
            .load_unet(loras, &Device::Cpu, DType::F32)
            .unwrap();
        unet.forward(&x, 537.25, &context, Some(&y)).unwrap()
    };
    assert!(
        relative_error(&eps(&[lora]), &eps(&[])) > 1e-4,
        "the UNet is patched"
    );
}

#[test]
fn split_unet_and_text_encoder_files_load_as_the_checkpoint_parts() {
    use std::collections::BTreeMap;

    use sakuga_models::demo::{DEMO_SEED, demo_checkpoint_tensors, demo_diffusers_tensors};
    use sakuga_models::diffusion::SdConfig;
    use sakuga_models::store::write_safetensors;

    let config = SdConfig::demo_sdxl();
    let dir = tempfile::tempdir().unwrap();
    let checkpoint_path = sakuga_models::demo::write_demo_sdxl_checkpoint(dir.path()).unwrap();
    let checkpoint = Checkpoint::open(&checkpoint_path).unwrap();
    // The UNet alone, its LDM names without the prefix (as ComfyUI's diffusion_models/).
    let unet_path = dir.path().join("unet.safetensors");
    let unet: BTreeMap<String, Tensor> = demo_checkpoint_tensors(&config, DEMO_SEED)
        .unwrap()
        .into_iter()
        .filter_map(|(k, v)| {
            k.strip_prefix("model.diffusion_model.")
                .map(|k| (k.to_string(), v))
        })
        .collect();
    write_safetensors(&unet_path, &unet, &BTreeMap::new()).unwrap();
    // The text encoders in transformers' layout, OpenCLIP-G's projection as a Linear weight.
    let parts = demo_diffusers_tensors(&config, DEMO_SEED).unwrap();
    let l_path = dir.path().join("clip_l.safetensors");
    write_safetensors(&l_path, &parts.clip, &BTreeMap::new()).unwrap();
    let g_path = dir.path().join("clip_g.safetensors");
    let g: BTreeMap<String, Tensor> = parts
        .clip_g
        .into_iter()
        .map(|(k, v)| match k.as_str() {
            "text_projection" => (
                "text_projection.weight".to_string(),
                v.t().unwrap().contiguous().unwrap(),
            ),
            _ => (k, v),
        })
        .collect();
    write_safetensors(&g_path, &g, &BTreeMap::new()).unwrap();

    let split_unet = Checkpoint::open_unet(&unet_path).unwrap();
    assert_eq!(split_unet.config().unet, checkpoint.config().unet);
    let split_clip = Checkpoint::open_text_encoders(&[&g_path, &l_path]).unwrap();
    assert_eq!(split_clip.config().clip, checkpoint.config().clip);
    assert_eq!(split_clip.config().clip_g, checkpoint.config().clip_g);

    let cpu = Device::Cpu;
    let encode = |c: &Checkpoint| {
        c.load_clip(&[], &cpu, DType::F32)
            .unwrap()
            .encode_pair("a fox", "a fox")
            .unwrap()
    };
    let (a, b) = (encode(&checkpoint), encode(&split_clip));
    assert!(relative_error(&b.context, &a.context) < 1e-6);
    assert!(relative_error(b.pooled.as_ref().unwrap(), a.pooled.as_ref().unwrap()) < 1e-6);
    let g = goldens();
    let (x, context, y) = (
        tensor(&g["unet"]["x"]),
        tensor(&g["context"]),
        tensor(&g["adm"]["y"]),
    );
    let eps = |c: &Checkpoint| {
        let unet = c.load_unet(&[], &cpu, DType::F32).unwrap();
        unet.forward(&x, 537.25, &context, Some(&y)).unwrap()
    };
    assert!(relative_error(&eps(&split_unet), &eps(&checkpoint)) < 1e-6);
    assert_eq!(
        split_unet
            .load_unet(&[], &cpu, DType::F32)
            .unwrap()
            .latent_scale(),
        0.13025
    );
    // A UNet file does not double as a text encoder, nor the other way round.
    assert!(Checkpoint::open_text_encoders(&[&unet_path]).is_err());
    assert!(Checkpoint::open_unet(&l_path).is_err());
    assert!(split_unet.load_clip(&[], &cpu, DType::F32).is_err());
}
