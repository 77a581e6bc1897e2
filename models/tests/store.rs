//! Public API tests of the model store: name resolution inside the models dir, combo
//! listings, and a readable error for every kind of bad model file.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use sakuga_models::ModelError;
use sakuga_models::demo::{DEMO_CHECKPOINT, DEMO_SEED, demo_checkpoint_tensors, write_demo_models};
use sakuga_models::diffusion::Checkpoint;
use sakuga_models::diffusion::config::{CONFIG_METADATA_KEY, SdConfig};
use sakuga_models::store::{ModelFolder, ModelStore, WeightFile, write_safetensors};

fn touch(path: &Path) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, b"x").unwrap();
}

#[test]
fn resolves_names_and_subfolders_inside_the_folder() {
    let dir = tempfile::tempdir().unwrap();
    let store = ModelStore::new(dir.path());
    touch(&dir.path().join("checkpoints/b.safetensors"));
    touch(&dir.path().join("checkpoints/anime/a.ckpt"));
    touch(&dir.path().join("checkpoints/notes.txt"));
    touch(&dir.path().join("loras/l.safetensors"));

    let resolved = store
        .resolve(ModelFolder::Checkpoints, "anime/a.ckpt")
        .unwrap();
    assert!(resolved.ends_with("checkpoints/anime/a.ckpt"));
    assert!(
        store
            .resolve(ModelFolder::Checkpoints, "anime\\a.ckpt")
            .is_ok()
    );
    assert_eq!(
        store.list(ModelFolder::Checkpoints),
        vec!["anime/a.ckpt".to_string(), "b.safetensors".to_string()]
    );
    assert_eq!(
        store.list(ModelFolder::Loras),
        vec!["l.safetensors".to_string()]
    );
    assert!(store.list(ModelFolder::Vae).is_empty());
}

#[test]
fn names_escaping_the_models_dir_are_rejected_with_the_name() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("models");
    touch(&root.join("checkpoints/ok.safetensors"));
    touch(&dir.path().join("secret.safetensors"));
    let store = ModelStore::new(&root);
    for name in [
        "../../secret.safetensors",
        "sub/../../secret.safetensors",
        "/etc/passwd",
    ] {
        let err = store.resolve(ModelFolder::Checkpoints, name).unwrap_err();
        assert!(
            matches!(err, ModelError::PathEscapes { .. }),
            "{name}: {err}"
        );
        assert!(err.to_string().contains(name), "{err}");
    }
    #[cfg(unix)]
    {
        std::os::unix::fs::symlink(
            dir.path().join("secret.safetensors"),
            root.join("checkpoints/link.safetensors"),
        )
        .unwrap();
        let err = store
            .resolve(ModelFolder::Checkpoints, "link.safetensors")
            .unwrap_err();
        assert!(matches!(err, ModelError::PathEscapes { .. }), "{err}");
        assert!(
            !store
                .list(ModelFolder::Checkpoints)
                .contains(&"link.safetensors".to_string())
        );
    }
    let err = store
        .resolve(ModelFolder::Checkpoints, "missing.safetensors")
        .unwrap_err();
    assert!(matches!(err, ModelError::NotFound { .. }), "{err}");
    assert!(err.to_string().contains("missing.safetensors"));
}

/// Writes the demo checkpoint's tensors after `edit` into `dir/name` and returns its path.
fn write_edited(
    dir: &Path,
    name: &str,
    edit: impl FnOnce(&mut BTreeMap<String, Tensor>),
) -> std::path::PathBuf {
    let config = SdConfig::demo();
    let mut tensors = demo_checkpoint_tensors(&config, DEMO_SEED).unwrap();
    edit(&mut tensors);
    let mut metadata = BTreeMap::new();
    metadata.insert(
        CONFIG_METADATA_KEY.to_string(),
        serde_json::to_string(&config).unwrap(),
    );
    let path = dir.join(name);
    write_safetensors(&path, &tensors, &metadata).unwrap();
    path
}

fn load_all(path: &Path) -> Result<(), ModelError> {
    let checkpoint = Checkpoint::open(path)?;
    checkpoint.load_clip(&[], &Device::Cpu, DType::F32)?;
    checkpoint.load_unet(&[], &Device::Cpu, DType::F32)?;
    checkpoint.load_vae(&Device::Cpu, DType::F32)?;
    Ok(())
}

#[test]
fn truncated_file_names_the_file_and_says_truncated() {
    let dir = tempfile::tempdir().unwrap();
    let written = write_demo_models(dir.path()).unwrap();
    let path = written
        .iter()
        .find(|p| p.ends_with(DEMO_CHECKPOINT))
        .unwrap()
        .clone();
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    let err = load_all(&path).unwrap_err();
    assert!(matches!(err, ModelError::Corrupt { .. }), "{err}");
    let message = err.to_string();
    assert!(message.contains(DEMO_CHECKPOINT), "{message}");
    assert!(message.contains("truncated"), "{message}");

    std::fs::write(&path, &bytes[..5]).unwrap();
    let err = WeightFile::open(&path).unwrap_err();
    assert!(err.to_string().contains("too short"), "{err}");

    std::fs::write(&path, b"\x10\0\0\0\0\0\0\0{not json at all").unwrap();
    let err = WeightFile::open(&path).unwrap_err();
    assert!(err.to_string().contains("not valid JSON"), "{err}");
}

#[test]
fn wrong_dtype_names_file_and_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let tensor = "model.diffusion_model.out.2.weight";
    let path = write_edited(dir.path(), "dtype.safetensors", |t| {
        let old = t.get(tensor).unwrap().clone();
        t.insert(tensor.to_string(), old.to_dtype(DType::U8).unwrap());
    });
    let err = load_all(&path).unwrap_err();
    assert!(matches!(err, ModelError::TensorMismatch { .. }), "{err}");
    let message = err.to_string();
    assert!(
        message.contains("dtype.safetensors") && message.contains(tensor),
        "{message}"
    );
    assert!(message.contains("U8"), "{message}");
}

#[test]
fn wrong_shape_names_file_and_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let tensor = "cond_stage_model.transformer.text_model.encoder.layers.1.mlp.fc1.weight";
    let path = write_edited(dir.path(), "shape.safetensors", |t| {
        t.insert(
            tensor.to_string(),
            Tensor::zeros((7, 3), DType::F32, &Device::Cpu).unwrap(),
        );
    });
    let err = load_all(&path).unwrap_err();
    assert!(matches!(err, ModelError::TensorMismatch { .. }), "{err}");
    let message = err.to_string();
    assert!(
        message.contains("shape.safetensors") && message.contains(tensor),
        "{message}"
    );
    assert!(message.contains("[7, 3]"), "{message}");
}

#[test]
fn missing_tensor_names_file_and_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let tensor = "first_stage_model.decoder.mid.attn_1.q.weight";
    let path = write_edited(dir.path(), "missing.safetensors", |t| {
        t.remove(tensor).unwrap();
    });
    let err = load_all(&path).unwrap_err();
    assert!(matches!(err, ModelError::MissingTensor { .. }), "{err}");
    let message = err.to_string();
    assert!(
        message.contains("missing.safetensors") && message.contains(tensor),
        "{message}"
    );
}

#[test]
fn non_checkpoints_are_reported_as_unsupported() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("plain.safetensors");
    let mut tensors = BTreeMap::new();
    tensors.insert(
        "weight".to_string(),
        Tensor::zeros(4, DType::F32, &Device::Cpu).unwrap(),
    );
    write_safetensors(&path, &tensors, &BTreeMap::new()).unwrap();
    let err = Checkpoint::open(&path).unwrap_err();
    assert!(matches!(err, ModelError::Unsupported { .. }), "{err}");
    assert!(err.to_string().contains("plain.safetensors"));
}

#[test]
fn safetensors_round_trip_keeps_values_and_metadata() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("rt.safetensors");
    let mut tensors = BTreeMap::new();
    let a = Tensor::new(&[[1.5f32, -2.0], [0.25, 8.0]], &Device::Cpu).unwrap();
    tensors.insert("a".to_string(), a.clone());
    tensors.insert("b".to_string(), a.to_dtype(DType::F16).unwrap());
    let mut metadata = BTreeMap::new();
    metadata.insert("k".to_string(), "v".to_string());
    write_safetensors(&path, &tensors, &metadata).unwrap();
    let file = WeightFile::open(&path).unwrap();
    assert_eq!(file.names(), vec!["a".to_string(), "b".to_string()]);
    assert_eq!(file.metadata().get("k").map(String::as_str), Some("v"));
    let back = file.load("a", &Device::Cpu).unwrap();
    assert_eq!(back.to_vec2::<f32>().unwrap(), a.to_vec2::<f32>().unwrap());
    assert_eq!(file.load("b", &Device::Cpu).unwrap().dtype(), DType::F16);
}
