//! Reading ncnn models (`.param` text graph + `.bin` weights) into PyTorch-named tensors.
//!
//! Real-ESRGAN's networks ship in ncnn format inside realesrgan-ncnn-vulkan and its Python
//! wheels. Rather than interpret ncnn graphs in general, this reads the weights in layer
//! order and names them the way the PyTorch state dict of the same network would, so one
//! network implementation serves every format. The graph is checked to be one of the two
//! Real-ESRGAN shapes: SRVGGNetCompact (Convolution/PReLU chain ending in PixelShuffle) or
//! RRDBNet (Convolution/Concat/Eltwise blocks).
//!
//! `.bin` layout per weighted layer, in `.param` order: a convolution's weights start with
//! a 4-byte tag (`0x01306B47` fp16, `0` or `0x0002C056` f32) followed by the values in
//! `[out][in][kh][kw]` order padded to 4 bytes, then `num_output` raw f32 biases (no tag)
//! when `5=1`. PReLU slopes are `0=num_slope` raw f32.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};

use super::weights::StateDict;
use crate::{ModelError, Result};

const MAGIC: &str = "7767517";
const TAG_FP16: u32 = 0x0130_6B47;
const TAG_FP32_SCALED: u32 = 0x0002_C056;
const TAG_INT8: u32 = 0x000D_4B38;

/// One line of a `.param` file.
#[derive(Debug, Clone)]
pub struct NcnnLayer {
    pub kind: String,
    pub name: String,
    pub inputs: Vec<String>,
    pub outputs: Vec<String>,
    /// `key=value` params; array params (`-233xx=n,a,b`) are stored under their real key
    /// `xx` with the comma-separated value text.
    pub params: HashMap<i32, String>,
}

impl NcnnLayer {
    fn int_param(&self, key: i32, default: i64, path: &Path) -> Result<i64> {
        match self.params.get(&key) {
            None => Ok(default),
            Some(text) => text.parse::<i64>().map_err(|_| ModelError::Corrupt {
                path: path.to_path_buf(),
                reason: format!("layer {}: param {key}={text} is not an integer", self.name),
            }),
        }
    }
}

/// A parsed `.param` graph.
#[derive(Debug, Clone)]
pub struct NcnnGraph {
    pub layers: Vec<NcnnLayer>,
}

fn corrupt(path: &Path, reason: impl Into<String>) -> ModelError {
    ModelError::Corrupt {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// Parses `.param` text.
///
/// # Errors
/// [`ModelError::Corrupt`] naming the line when the text is not an ncnn param file.
pub fn parse_param(text: &str, path: &Path) -> Result<NcnnGraph> {
    let mut lines = text.lines().filter(|l| !l.trim().is_empty());
    match lines.next().map(str::trim) {
        Some(MAGIC) => {}
        Some(other) => {
            return Err(corrupt(
                path,
                format!("bad magic {other:?}, expected {MAGIC} (not an ncnn .param file)"),
            ));
        }
        None => return Err(corrupt(path, "empty .param file")),
    }
    let counts: Vec<usize> = lines
        .next()
        .ok_or_else(|| corrupt(path, "missing the layer and blob count line"))?
        .split_whitespace()
        .map(str::parse)
        .collect::<std::result::Result<_, _>>()
        .map_err(|_| corrupt(path, "the layer and blob count line is not two integers"))?;
    let [layer_count, _blob_count] = counts[..] else {
        return Err(corrupt(
            path,
            "the layer and blob count line is not two integers",
        ));
    };
    let mut layers = Vec::with_capacity(layer_count);
    for (index, line) in lines.enumerate() {
        let line_no = index + 3;
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.len() < 4 {
            return Err(corrupt(path, format!("line {line_no}: too few fields")));
        }
        let parse_count = |text: &str| {
            text.parse::<usize>()
                .map_err(|_| corrupt(path, format!("line {line_no}: bad blob count {text:?}")))
        };
        let n_in = parse_count(fields[2])?;
        let n_out = parse_count(fields[3])?;
        if fields.len() < 4 + n_in + n_out {
            return Err(corrupt(
                path,
                format!("line {line_no}: fewer blob names than counted"),
            ));
        }
        let inputs = fields[4..4 + n_in].iter().map(|s| s.to_string()).collect();
        let outputs = fields[4 + n_in..4 + n_in + n_out]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let mut params = HashMap::new();
        for item in &fields[4 + n_in + n_out..] {
            let (key, value) = item.split_once('=').ok_or_else(|| {
                corrupt(path, format!("line {line_no}: param {item:?} has no '='"))
            })?;
            let key: i32 = key
                .parse()
                .map_err(|_| corrupt(path, format!("line {line_no}: bad param key {key:?}")))?;
            // -23300 - k marks an array value for key k.
            let key = if key <= -23300 { -(key + 23300) } else { key };
            params.insert(key, value.to_string());
        }
        layers.push(NcnnLayer {
            kind: fields[0].to_string(),
            name: fields[1].to_string(),
            inputs,
            outputs,
            params,
        });
    }
    if layers.len() != layer_count {
        return Err(corrupt(
            path,
            format!("header says {layer_count} layers, found {}", layers.len()),
        ));
    }
    Ok(NcnnGraph { layers })
}

/// Reads `.bin` weights sequentially, reporting truncation with the layer it hit.
struct BinReader<'a> {
    bytes: &'a [u8],
    at: usize,
    path: &'a Path,
}

impl BinReader<'_> {
    fn take(&mut self, len: usize, layer: &str, what: &str) -> Result<&[u8]> {
        if self.bytes.len() - self.at < len {
            return Err(corrupt(
                self.path,
                format!(
                    "truncated: {what} of layer {layer} needs {len} bytes at offset {}, file has {}",
                    self.at,
                    self.bytes.len()
                ),
            ));
        }
        let slice = &self.bytes[self.at..self.at + len];
        self.at += len;
        Ok(slice)
    }

    fn raw_f32(&mut self, count: usize, layer: &str, what: &str) -> Result<Vec<f32>> {
        let bytes = self.take(count * 4, layer, what)?;
        Ok(bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect())
    }

    /// A tagged weight blob of `count` values.
    fn tagged(&mut self, count: usize, layer: &str) -> Result<Vec<f32>> {
        let tag_bytes = self.take(4, layer, "weight tag")?;
        let tag = u32::from_le_bytes([tag_bytes[0], tag_bytes[1], tag_bytes[2], tag_bytes[3]]);
        match tag {
            TAG_FP16 => {
                let bytes = self.take(count * 2, layer, "fp16 weights")?;
                let values = bytes
                    .chunks_exact(2)
                    .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
                    .collect();
                // fp16 blobs are padded to a 4-byte boundary.
                let padding = (4 - (count * 2) % 4) % 4;
                self.take(padding, layer, "fp16 padding")?;
                Ok(values)
            }
            0 | TAG_FP32_SCALED => self.raw_f32(count, layer, "f32 weights"),
            TAG_INT8 => Err(ModelError::Unsupported {
                path: self.path.to_path_buf(),
                reason: format!("layer {layer} has int8-quantised weights"),
            }),
            other => Err(corrupt(
                self.path,
                format!(
                    "layer {layer}: unknown weight tag {other:#010x} at offset {}",
                    self.at - 4
                ),
            )),
        }
    }
}

/// A convolution's weights as read from the `.bin`.
#[derive(Debug, Clone)]
struct ConvWeights {
    layer: String,
    weight: Tensor,
    bias: Option<Tensor>,
}

/// Loads `<name>.param` and the `<name>.bin` beside it as a PyTorch-named state dict.
///
/// # Errors
/// [`ModelError::Io`] for unreadable files (the `.bin` named when it is the one missing),
/// [`ModelError::Corrupt`] for malformed text, truncated or oversized weights,
/// [`ModelError::Unsupported`] for graphs that are not a Real-ESRGAN network.
pub fn load_state_dict(param_path: &Path, device: &Device) -> Result<StateDict> {
    let text = std::fs::read(param_path).map_err(|source| ModelError::Io {
        path: param_path.to_path_buf(),
        source,
    })?;
    let text = String::from_utf8(text)
        .map_err(|_| corrupt(param_path, "not UTF-8 text (not an ncnn .param file)"))?;
    let graph = parse_param(&text, param_path)?;
    let bin_path: PathBuf = param_path.with_extension("bin");
    let bytes = std::fs::read(&bin_path).map_err(|source| ModelError::Io {
        path: bin_path.clone(),
        source,
    })?;
    let mut reader = BinReader {
        bytes: &bytes,
        at: 0,
        path: &bin_path,
    };

    let mut convs = Vec::new();
    let mut prelus = Vec::new();
    // Interleaving of convs and PReLUs, as SRVGG's `body` sequence indexes them.
    let mut sequence = Vec::new();
    for layer in &graph.layers {
        match layer.kind.as_str() {
            "Convolution" => {
                let out = layer.int_param(0, 0, param_path)? as usize;
                let kw = layer.int_param(1, 0, param_path)? as usize;
                let kh = layer.int_param(11, kw as i64, param_path)? as usize;
                let has_bias = layer.int_param(5, 0, param_path)? != 0;
                let size = layer.int_param(6, 0, param_path)? as usize;
                if out == 0 || kw == 0 || size == 0 || !size.is_multiple_of(out * kh * kw) {
                    return Err(corrupt(
                        param_path,
                        format!(
                            "layer {}: weight size {size} does not fit {out} outputs of {kh}x{kw}",
                            layer.name
                        ),
                    ));
                }
                let c_in = size / (out * kh * kw);
                let values = reader.tagged(size, &layer.name)?;
                let weight = Tensor::from_vec(values, (out, c_in, kh, kw), device)?;
                let bias = if has_bias {
                    let values = reader.raw_f32(out, &layer.name, "bias")?;
                    Some(Tensor::from_vec(values, out, device)?)
                } else {
                    None
                };
                sequence.push(true);
                convs.push(ConvWeights {
                    layer: layer.name.clone(),
                    weight,
                    bias,
                });
            }
            "PReLU" => {
                let count = layer.int_param(0, 1, param_path)? as usize;
                let values = reader.raw_f32(count, &layer.name, "prelu slopes")?;
                sequence.push(false);
                prelus.push(Tensor::from_vec(values, count, device)?);
            }
            "Input" | "Split" | "Concat" | "Eltwise" | "Interp" | "PixelShuffle" | "BinaryOp"
            | "Reshape" | "Permute" => {}
            other => {
                return Err(ModelError::Unsupported {
                    path: param_path.to_path_buf(),
                    reason: format!(
                        "ncnn layer type {other} ({}) is not part of a Real-ESRGAN network",
                        layer.name
                    ),
                });
            }
        }
    }
    if reader.at != bytes.len() {
        return Err(corrupt(
            &bin_path,
            format!(
                "{} trailing bytes after the last layer's weights (the .bin does not belong to this .param)",
                bytes.len() - reader.at
            ),
        ));
    }

    let has = |kind: &str| graph.layers.iter().any(|l| l.kind == kind);
    let mut tensors = BTreeMap::new();
    if has("PixelShuffle") && !prelus.is_empty() {
        // SRVGGNetCompact: body = [conv, prelu, conv, prelu, ..., conv].
        let (mut conv_iter, mut prelu_iter) = (convs.into_iter(), prelus.into_iter());
        for (index, is_conv) in sequence.into_iter().enumerate() {
            if is_conv {
                let conv = conv_iter.next().expect("sequence counts every conv");
                insert_conv(&mut tensors, &format!("body.{index}"), conv);
            } else {
                let slopes = prelu_iter.next().expect("sequence counts every prelu");
                tensors.insert(format!("body.{index}.weight"), slopes);
            }
        }
    } else if has("Concat") && has("Eltwise") && prelus.is_empty() {
        let names = rrdb_conv_names(convs.len()).ok_or_else(|| ModelError::Unsupported {
            path: param_path.to_path_buf(),
            reason: format!(
                "{} convolutions do not form an RRDBNet (6 + 15 per block)",
                convs.len()
            ),
        })?;
        for (name, conv) in names.into_iter().zip(convs) {
            insert_conv(&mut tensors, &name, conv);
        }
    } else {
        return Err(ModelError::Unsupported {
            path: param_path.to_path_buf(),
            reason: "the graph is neither SRVGGNetCompact nor RRDBNet".to_string(),
        });
    }
    Ok(StateDict::from_tensors(param_path, tensors))
}

fn insert_conv(tensors: &mut BTreeMap<String, Tensor>, prefix: &str, conv: ConvWeights) {
    tracing::trace!(layer = %conv.layer, name = prefix, "ncnn convolution mapped");
    tensors.insert(format!("{prefix}.weight"), conv.weight);
    if let Some(bias) = conv.bias {
        tensors.insert(format!("{prefix}.bias"), bias);
    }
}

/// RRDBNet's convolution names in forward order, for `count` convolutions.
fn rrdb_conv_names(count: usize) -> Option<Vec<String>> {
    if count < 21 || !(count - 6).is_multiple_of(15) {
        return None;
    }
    let blocks = (count - 6) / 15;
    let mut names = vec!["conv_first".to_string()];
    for block in 0..blocks {
        for rdb in 1..=3 {
            for conv in 1..=5 {
                names.push(format!("body.{block}.rdb{rdb}.conv{conv}"));
            }
        }
    }
    names.extend(["conv_body", "conv_up1", "conv_up2", "conv_hr", "conv_last"].map(String::from));
    Some(names)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_layers_and_array_params() {
        let text = "7767517\n2 2\nInput in 0 1 data\nConvolution c0 1 1 data out 0=4 1=3 5=1 6=108 9=2 -23310=1,2.000000e-01\n";
        let graph = parse_param(text, Path::new("x.param")).unwrap();
        assert_eq!(graph.layers.len(), 2);
        let conv = &graph.layers[1];
        assert_eq!(conv.inputs, vec!["data"]);
        assert_eq!(conv.outputs, vec!["out"]);
        assert_eq!(conv.params[&10], "1,2.000000e-01");
        assert_eq!(conv.int_param(6, 0, Path::new("x")).unwrap(), 108);
    }

    #[test]
    fn rejects_bad_magic_and_miscounted_layers() {
        let err = parse_param("1234\n1 1\n", Path::new("m.param")).unwrap_err();
        assert!(err.to_string().contains("bad magic"), "{err}");
        let err =
            parse_param("7767517\n3 1\nInput in 0 1 data\n", Path::new("m.param")).unwrap_err();
        assert!(
            err.to_string().contains("header says 3 layers, found 1"),
            "{err}"
        );
    }

    #[test]
    fn rrdb_names_cover_every_conv() {
        let names = rrdb_conv_names(96).unwrap();
        assert_eq!(names.len(), 96);
        assert_eq!(names[1], "body.0.rdb1.conv1");
        assert_eq!(names[90], "body.5.rdb3.conv5");
        assert_eq!(names[95], "conv_last");
        assert!(rrdb_conv_names(97).is_none());
    }
}
