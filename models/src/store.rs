//! The models directory and the weight files in it.
//!
//! sakuga reads models from a directory laid out like ComfyUI's `models/` folder
//! (`checkpoints/`, `vae/`, `loras/`, `upscale_models/`, `frame_interpolation/`), so a user
//! can point `--models-dir` at an existing ComfyUI install. [`ModelStore`] turns a name from a
//! workflow into a path without ever leaving that directory, and lists what is there for the
//! combo inputs of loader nodes.
//!
//! [`WeightFile`] opens one file of tensors: `.safetensors` through a memory map (the header
//! is parsed and checked against the file size first, so a truncated download is reported
//! by name instead of faulting later) and `.pth`/`.pt`/`.ckpt` through candle's pickle reader.

use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::path::{Component, Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use crate::cache::{ModelKind, record_model_read};
use crate::error::{ModelError, Result};

/// One of the ComfyUI model folders.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ModelFolder {
    Checkpoints,
    Vae,
    Loras,
    UpscaleModels,
    InterpolationModels,
    /// Textual-inversion embeddings, named in prompts as `embedding:name`.
    Embeddings,
    /// Diffusion models alone (`UNETLoader`).
    DiffusionModels,
    /// Text encoders alone (`CLIPLoader`, `DualCLIPLoader`).
    TextEncoders,
    /// ControlNets (`ControlNetLoader`).
    ControlNet,
    /// CLIP vision encoders (`CLIPVisionLoader`).
    ClipVision,
}

impl ModelFolder {
    /// Every folder, in the order ComfyUI lists them.
    pub const ALL: [ModelFolder; 10] = [
        ModelFolder::Checkpoints,
        ModelFolder::Vae,
        ModelFolder::Loras,
        ModelFolder::UpscaleModels,
        ModelFolder::InterpolationModels,
        ModelFolder::Embeddings,
        ModelFolder::DiffusionModels,
        ModelFolder::TextEncoders,
        ModelFolder::ControlNet,
        ModelFolder::ClipVision,
    ];

    /// The folder of a directory name (`checkpoints`, `upscale_models`...).
    pub fn from_dir_name(name: &str) -> Option<ModelFolder> {
        ModelFolder::ALL.into_iter().find(|f| f.dir_name() == name)
    }

    /// The directory name under the models root, as ComfyUI names it.
    pub fn dir_name(self) -> &'static str {
        match self {
            ModelFolder::Checkpoints => "checkpoints",
            ModelFolder::Vae => "vae",
            ModelFolder::Loras => "loras",
            ModelFolder::UpscaleModels => "upscale_models",
            ModelFolder::InterpolationModels => "frame_interpolation",
            ModelFolder::Embeddings => "embeddings",
            ModelFolder::DiffusionModels => "diffusion_models",
            ModelFolder::TextEncoders => "text_encoders",
            ModelFolder::ControlNet => "controlnet",
            ModelFolder::ClipVision => "clip_vision",
        }
    }

    /// The `kind` label of models from this folder in cache and load metrics.
    pub fn kind(self) -> ModelKind {
        match self {
            ModelFolder::Checkpoints => ModelKind::Checkpoint,
            ModelFolder::Vae => ModelKind::Vae,
            ModelFolder::Loras => ModelKind::Lora,
            ModelFolder::UpscaleModels => ModelKind::Upscale,
            ModelFolder::InterpolationModels => ModelKind::Interpolation,
            ModelFolder::Embeddings | ModelFolder::TextEncoders | ModelFolder::ClipVision => {
                ModelKind::Clip
            }
            ModelFolder::DiffusionModels => ModelKind::Checkpoint,
            ModelFolder::ControlNet => ModelKind::ControlNet,
        }
    }

    /// File extensions ComfyUI offers in this folder's combo list.
    pub fn extensions(self) -> &'static [&'static str] {
        match self {
            ModelFolder::Checkpoints
            | ModelFolder::Vae
            | ModelFolder::Loras
            | ModelFolder::Embeddings
            | ModelFolder::DiffusionModels
            | ModelFolder::TextEncoders
            | ModelFolder::ControlNet
            | ModelFolder::ClipVision => &["safetensors", "ckpt", "pt", "pth", "bin", "sft"],
            ModelFolder::UpscaleModels | ModelFolder::InterpolationModels => {
                &["safetensors", "pth", "pt", "ckpt", "bin", "param", "sft"]
            }
        }
    }
}

/// A models directory in ComfyUI's layout.
#[derive(Debug, Clone)]
pub struct ModelStore {
    root: PathBuf,
}

impl ModelStore {
    /// A store rooted at `root`; nothing is touched until a name is resolved.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// The models root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where `folder` lives (it may not exist yet).
    pub fn folder_path(&self, folder: ModelFolder) -> PathBuf {
        self.root.join(folder.dir_name())
    }

    /// Turns a model name from a workflow into the path of an existing file inside `folder`.
    ///
    /// Names may contain subfolders (`anime/model.safetensors`, with `/` or `\`), as ComfyUI
    /// allows; they may not be absolute, contain `..`, or reach outside the folder through a
    /// symlink.
    ///
    /// # Errors
    /// [`ModelError::PathEscapes`] for names that leave the folder, [`ModelError::NotFound`]
    /// when no such file exists.
    pub fn resolve(&self, folder: ModelFolder, name: &str) -> Result<PathBuf> {
        let folder_dir = self.folder_path(folder);
        let escapes = || ModelError::PathEscapes {
            name: name.to_string(),
            root: folder_dir.clone(),
        };
        let normalised = name.replace('\\', "/");
        if normalised.trim().is_empty() {
            return Err(ModelError::NotFound {
                name: name.to_string(),
                folder: folder_dir.clone(),
            });
        }
        let relative = Path::new(&normalised);
        for component in relative.components() {
            match component {
                Component::Normal(_) | Component::CurDir => {}
                Component::ParentDir | Component::RootDir | Component::Prefix(_) => {
                    return Err(escapes());
                }
            }
        }
        let candidate = folder_dir.join(relative);
        if !candidate.exists() {
            return Err(ModelError::NotFound {
                name: name.to_string(),
                folder: folder_dir.clone(),
            });
        }
        let canonical_folder = folder_dir.canonicalize().map_err(|source| ModelError::Io {
            path: folder_dir.clone(),
            source,
        })?;
        let canonical = candidate.canonicalize().map_err(|source| ModelError::Io {
            path: candidate.clone(),
            source,
        })?;
        if !canonical.starts_with(&canonical_folder) {
            return Err(escapes());
        }
        if !canonical.is_file() {
            return Err(ModelError::NotFound {
                name: name.to_string(),
                folder: folder_dir,
            });
        }
        Ok(canonical)
    }

    /// Model names in `folder` (recursively, `/`-separated, sorted), as a loader node's combo
    /// list. A missing folder lists nothing; entries that would not resolve are left out.
    pub fn list(&self, folder: ModelFolder) -> Vec<String> {
        let folder_dir = self.folder_path(folder);
        let mut names = Vec::new();
        collect_names(&folder_dir, "", folder.extensions(), &mut names, 0);
        names.retain(|name| self.resolve(folder, name).is_ok());
        names.sort();
        names
    }
}

/// Deepest subfolder nesting walked by [`ModelStore::list`]; guards against symlink loops.
const MAX_LIST_DEPTH: usize = 8;

fn collect_names(
    dir: &Path,
    prefix: &str,
    extensions: &[&str],
    names: &mut Vec<String>,
    depth: usize,
) {
    if depth > MAX_LIST_DEPTH {
        return;
    }
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let file_name = entry.file_name();
        let Some(file_name) = file_name.to_str() else {
            continue;
        };
        if file_name.starts_with('.') {
            continue;
        }
        let path = entry.path();
        let name = format!("{prefix}{file_name}");
        if path.is_dir() {
            collect_names(&path, &format!("{name}/"), extensions, names, depth + 1);
        } else if has_extension(&path, extensions) {
            names.push(name);
        }
    }
}

fn has_extension(path: &Path, extensions: &[&str]) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| extensions.iter().any(|x| x.eq_ignore_ascii_case(e)))
}

/// Name, dtype and shape of one tensor in a weight file, read without loading its data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    pub dtype: DType,
    pub shape: Vec<usize>,
}

/// A header entry of a `.safetensors` file: where its bytes are within the data section.
#[derive(Debug, Clone)]
struct SafetensorsEntry {
    info: TensorInfo,
    begin: usize,
    end: usize,
}

/// A memory-mapped `.safetensors` file whose header has been checked.
pub struct SafetensorsFile {
    path: PathBuf,
    mmap: memmap2::Mmap,
    data_start: usize,
    tensors: BTreeMap<String, SafetensorsEntry>,
    metadata: HashMap<String, String>,
}

impl std::fmt::Debug for SafetensorsFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SafetensorsFile")
            .field("path", &self.path)
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

/// Headers larger than this are not safetensors files (the format caps them at 100 MB).
const MAX_HEADER_BYTES: u64 = 100_000_000;

impl SafetensorsFile {
    /// Opens and validates `path`: header JSON, dtypes, shapes and byte ranges all agree with
    /// each other and with the file's length.
    ///
    /// # Errors
    /// [`ModelError::Io`] when it cannot be read, [`ModelError::Corrupt`] naming what is
    /// inconsistent, [`ModelError::Unsupported`] for dtypes candle cannot hold.
    pub fn open(path: &Path) -> Result<Self> {
        let corrupt = |reason: String| ModelError::Corrupt {
            path: path.to_path_buf(),
            reason,
        };
        let io = |source| ModelError::Io {
            path: path.to_path_buf(),
            source,
        };
        let mut file = std::fs::File::open(path).map_err(io)?;
        let file_len = file.metadata().map_err(io)?.len();
        if file_len < 8 {
            return Err(corrupt(format!(
                "file is {file_len} bytes, too short for a safetensors header"
            )));
        }
        let mut len_bytes = [0u8; 8];
        file.read_exact(&mut len_bytes).map_err(io)?;
        let header_len = u64::from_le_bytes(len_bytes);
        if header_len > MAX_HEADER_BYTES || 8 + header_len > file_len {
            return Err(corrupt(format!(
                "header claims {header_len} bytes but the file has {} after the length prefix",
                file_len - 8
            )));
        }
        let mut header = vec![0u8; header_len as usize];
        file.read_exact(&mut header).map_err(io)?;
        let header: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&header)
            .map_err(|e| corrupt(format!("header is not valid JSON: {e}")))?;
        let data_start = 8 + header_len as usize;
        let data_len = (file_len - 8 - header_len) as usize;
        let mut tensors = BTreeMap::new();
        let mut metadata = HashMap::new();
        for (name, value) in header {
            if name == "__metadata__" {
                if let Some(map) = value.as_object() {
                    for (k, v) in map {
                        if let Some(v) = v.as_str() {
                            metadata.insert(k.clone(), v.to_string());
                        }
                    }
                }
                continue;
            }
            let entry = parse_entry(path, &name, &value, data_len)?;
            tensors.insert(name, entry);
        }
        // SAFETY: the map is read-only and only ever read through bounds-checked slices whose
        // ranges were validated against the file length above. As with every mmap loader
        // (candle's, ComfyUI's), the file must not be truncated by another process while it is
        // mapped; model folders are treated as immutable while sakuga runs.
        #[allow(unsafe_code)]
        let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(io)?;
        if mmap.len() as u64 != file_len {
            return Err(corrupt("file changed size while being opened".to_string()));
        }
        Ok(Self {
            path: path.to_path_buf(),
            mmap,
            data_start,
            tensors,
            metadata,
        })
    }

    /// The file this was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The `__metadata__` string map of the header.
    pub fn metadata(&self) -> &HashMap<String, String> {
        &self.metadata
    }

    /// Tensor names, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    /// Dtype and shape of `name`, if present.
    pub fn info(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.get(name).map(|e| &e.info)
    }

    /// Total bytes of tensor data in the file.
    pub fn data_bytes(&self) -> u64 {
        self.tensors
            .values()
            .map(|e| (e.end - e.begin) as u64)
            .sum()
    }

    /// Copies tensor `name` onto `device` in its stored dtype.
    ///
    /// # Errors
    /// [`ModelError::MissingTensor`] when absent, [`ModelError::Candle`] when the device
    /// cannot hold it.
    pub fn load(&self, name: &str, device: &Device) -> Result<Tensor> {
        let entry = self
            .tensors
            .get(name)
            .ok_or_else(|| ModelError::MissingTensor {
                path: self.path.clone(),
                tensor: name.to_string(),
            })?;
        let bytes = &self.mmap[self.data_start + entry.begin..self.data_start + entry.end];
        record_model_read(bytes.len() as u64);
        Ok(Tensor::from_raw_buffer(
            bytes,
            entry.info.dtype,
            &entry.info.shape,
            device,
        )?)
    }
}

fn parse_entry(
    path: &Path,
    name: &str,
    value: &serde_json::Value,
    data_len: usize,
) -> Result<SafetensorsEntry> {
    let corrupt = |reason: String| ModelError::Corrupt {
        path: path.to_path_buf(),
        reason: format!("tensor {name:?}: {reason}"),
    };
    let dtype_name = value
        .get("dtype")
        .and_then(|d| d.as_str())
        .ok_or_else(|| corrupt("header entry has no dtype".to_string()))?;
    let dtype = match dtype_name {
        "F16" => DType::F16,
        "BF16" => DType::BF16,
        "F32" => DType::F32,
        "F64" => DType::F64,
        "U8" => DType::U8,
        "U32" => DType::U32,
        "I64" => DType::I64,
        other => {
            return Err(ModelError::Unsupported {
                path: path.to_path_buf(),
                reason: format!("tensor {name:?} has dtype {other}, which sakuga cannot load"),
            });
        }
    };
    let shape: Vec<usize> = value
        .get("shape")
        .and_then(|s| s.as_array())
        .ok_or_else(|| corrupt("header entry has no shape".to_string()))?
        .iter()
        .map(|d| d.as_u64().map(|d| d as usize))
        .collect::<Option<_>>()
        .ok_or_else(|| corrupt("shape is not a list of sizes".to_string()))?;
    let offsets: Vec<usize> = value
        .get("data_offsets")
        .and_then(|s| s.as_array())
        .map(|a| {
            a.iter()
                .filter_map(|d| d.as_u64().map(|d| d as usize))
                .collect()
        })
        .ok_or_else(|| corrupt("header entry has no data_offsets".to_string()))?;
    let [begin, end] = offsets[..] else {
        return Err(corrupt("data_offsets is not [begin, end]".to_string()));
    };
    let expected = shape.iter().product::<usize>() * dtype.size_in_bytes();
    if end < begin || end - begin != expected {
        return Err(corrupt(format!(
            "holds {} bytes but {dtype_name} {shape:?} needs {expected}",
            end.saturating_sub(begin)
        )));
    }
    if end > data_len {
        return Err(corrupt(format!(
            "data ends at byte {end} but the file's data section has only {data_len} bytes \
             (truncated file?)"
        )));
    }
    Ok(SafetensorsEntry {
        info: TensorInfo { dtype, shape },
        begin,
        end,
    })
}

/// A `.pth`/`.pt`/`.ckpt` pickle checkpoint, read fully into memory by candle's reader.
#[derive(Debug)]
pub struct PthFile {
    path: PathBuf,
    tensors: BTreeMap<String, Tensor>,
}

impl PthFile {
    /// Reads every tensor of a PyTorch pickle file (a `state_dict` or one under a
    /// `state_dict`/`params` key, as upscaler files ship).
    ///
    /// # Errors
    /// [`ModelError::Corrupt`] when the pickle cannot be parsed.
    pub fn open(path: &Path) -> Result<Self> {
        if let Err(source) = std::fs::metadata(path) {
            return Err(ModelError::Io {
                path: path.to_path_buf(),
                source,
            });
        }
        let corrupt = |e: candle_core::Error| ModelError::Corrupt {
            path: path.to_path_buf(),
            reason: format!("not a readable PyTorch pickle: {e}"),
        };
        let mut tensors = BTreeMap::new();
        let mut last_error = None;
        for key in [None, Some("state_dict"), Some("params_ema"), Some("params")] {
            match candle_core::pickle::read_all_with_key(path, key) {
                Ok(list) if !list.is_empty() => {
                    tensors = list.into_iter().collect();
                    break;
                }
                Ok(_) => {}
                Err(e) => last_error = Some(e),
            }
        }
        if tensors.is_empty() {
            return Err(match last_error {
                Some(e) => corrupt(e),
                None => ModelError::Corrupt {
                    path: path.to_path_buf(),
                    reason: "holds no tensors".to_string(),
                },
            });
        }
        let bytes: u64 = tensors
            .values()
            .map(|t| (t.elem_count() * t.dtype().size_in_bytes()) as u64)
            .sum();
        record_model_read(bytes);
        Ok(Self {
            path: path.to_path_buf(),
            tensors,
        })
    }
}

/// A file of named tensors in any format sakuga reads.
#[derive(Debug)]
pub enum WeightFile {
    Safetensors(SafetensorsFile),
    Pth(PthFile),
}

impl WeightFile {
    /// Opens `path`, choosing the reader from its extension (`.safetensors`/`.sft` are
    /// memory-mapped, anything else goes through the pickle reader).
    ///
    /// # Errors
    /// As [`SafetensorsFile::open`] and [`PthFile::open`].
    pub fn open(path: &Path) -> Result<Self> {
        if has_extension(path, &["safetensors", "sft"]) {
            SafetensorsFile::open(path).map(WeightFile::Safetensors)
        } else {
            PthFile::open(path).map(WeightFile::Pth)
        }
    }

    /// The file this was opened from.
    pub fn path(&self) -> &Path {
        match self {
            WeightFile::Safetensors(f) => f.path(),
            WeightFile::Pth(f) => &f.path,
        }
    }

    /// Tensor names, sorted.
    pub fn names(&self) -> Vec<String> {
        match self {
            WeightFile::Safetensors(f) => f.names().map(str::to_string).collect(),
            WeightFile::Pth(f) => f.tensors.keys().cloned().collect(),
        }
    }

    /// Safetensors `__metadata__` (empty for pickles).
    pub fn metadata(&self) -> HashMap<String, String> {
        match self {
            WeightFile::Safetensors(f) => f.metadata().clone(),
            WeightFile::Pth(_) => HashMap::new(),
        }
    }

    /// Dtype and shape of `name` without loading it.
    pub fn info(&self, name: &str) -> Option<TensorInfo> {
        match self {
            WeightFile::Safetensors(f) => f.info(name).cloned(),
            WeightFile::Pth(f) => f.tensors.get(name).map(|t| TensorInfo {
                dtype: t.dtype(),
                shape: t.dims().to_vec(),
            }),
        }
    }

    /// Whether the file holds `name`.
    pub fn contains(&self, name: &str) -> bool {
        self.info(name).is_some()
    }

    /// Loads `name` onto `device` in its stored dtype.
    ///
    /// # Errors
    /// [`ModelError::MissingTensor`] when absent.
    pub fn load(&self, name: &str, device: &Device) -> Result<Tensor> {
        match self {
            WeightFile::Safetensors(f) => f.load(name, device),
            WeightFile::Pth(f) => f
                .tensors
                .get(name)
                .ok_or_else(|| ModelError::MissingTensor {
                    path: f.path.clone(),
                    tensor: name.to_string(),
                })?
                .to_device(device)
                .map_err(ModelError::from),
        }
    }

    /// Loads `name` as a float tensor of `shape` in `dtype`, checking both.
    ///
    /// # Errors
    /// [`ModelError::MissingTensor`], or [`ModelError::TensorMismatch`] naming the tensor,
    /// what it is and what was expected when the shape differs or the stored dtype is not a
    /// float type.
    pub fn load_checked(
        &self,
        name: &str,
        shape: &[usize],
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        let info = self.info(name).ok_or_else(|| ModelError::MissingTensor {
            path: self.path().to_path_buf(),
            tensor: name.to_string(),
        })?;
        check_float_tensor(self.path(), name, &info, shape)?;
        Ok(self.load(name, device)?.to_dtype(dtype)?)
    }
}

/// Checks that a stored tensor is a float tensor of the expected shape.
///
/// # Errors
/// [`ModelError::TensorMismatch`] naming the file, the tensor, and both descriptions.
pub fn check_float_tensor(
    path: &Path,
    name: &str,
    info: &TensorInfo,
    expected_shape: &[usize],
) -> Result<()> {
    let is_float = matches!(
        info.dtype,
        DType::F16 | DType::BF16 | DType::F32 | DType::F64
    );
    if !is_float || info.shape != expected_shape {
        return Err(ModelError::TensorMismatch {
            path: path.to_path_buf(),
            tensor: name.to_string(),
            expected: format!("a float tensor of shape {expected_shape:?}"),
            found: format!("{:?} {:?}", info.dtype, info.shape),
        });
    }
    Ok(())
}

/// Writes `tensors` as a `.safetensors` file with `metadata`, atomically (temp file and
/// rename), so a reader never sees a half-written model.
///
/// # Errors
/// [`ModelError::Io`] when the file cannot be written.
pub fn write_safetensors(
    path: &Path,
    tensors: &BTreeMap<String, Tensor>,
    metadata: &BTreeMap<String, String>,
) -> Result<()> {
    let io = |source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut header = serde_json::Map::new();
    if !metadata.is_empty() {
        let meta: serde_json::Map<String, serde_json::Value> = metadata
            .iter()
            .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
            .collect();
        header.insert("__metadata__".to_string(), serde_json::Value::Object(meta));
    }
    let mut data = Vec::new();
    for (name, tensor) in tensors {
        let (dtype_name, bytes) = tensor_bytes(tensor)?;
        let begin = data.len();
        data.extend_from_slice(&bytes);
        header.insert(
            name.clone(),
            serde_json::json!({
                "dtype": dtype_name,
                "shape": tensor.dims(),
                "data_offsets": [begin, data.len()],
            }),
        );
    }
    let mut header_bytes = serde_json::to_vec(&serde_json::Value::Object(header))
        .map_err(|e| io(std::io::Error::other(e)))?;
    // The data section must start 8-byte aligned for zero-copy readers.
    while (header_bytes.len() + 8) % 8 != 0 {
        header_bytes.push(b' ');
    }
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(io)?;
    }
    let tmp = path.with_extension("safetensors.tmp");
    let mut out = Vec::with_capacity(8 + header_bytes.len() + data.len());
    out.extend_from_slice(&(header_bytes.len() as u64).to_le_bytes());
    out.extend_from_slice(&header_bytes);
    out.extend_from_slice(&data);
    std::fs::write(&tmp, &out).map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)?;
    Ok(())
}

fn tensor_bytes(tensor: &Tensor) -> Result<(&'static str, Vec<u8>)> {
    let flat = tensor.flatten_all()?;
    Ok(match tensor.dtype() {
        DType::F32 => (
            "F32",
            flat.to_vec1::<f32>()?
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
        ),
        DType::F16 => (
            "F16",
            flat.to_vec1::<half::f16>()?
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
        ),
        DType::BF16 => (
            "BF16",
            flat.to_vec1::<half::bf16>()?
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
        ),
        DType::F64 => (
            "F64",
            flat.to_vec1::<f64>()?
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
        ),
        DType::U8 => ("U8", flat.to_vec1::<u8>()?),
        DType::U32 => (
            "U32",
            flat.to_vec1::<u32>()?
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
        ),
        DType::I64 => (
            "I64",
            flat.to_vec1::<i64>()?
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
        ),
        other => {
            return Err(ModelError::InvalidInput(format!(
                "cannot write dtype {other:?} to safetensors"
            )));
        }
    })
}
