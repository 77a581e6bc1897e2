//! Values that flow between nodes at run time.
//!
//! Images and masks are ComfyUI-style float tensors: images `(batch, height, width,
//! channels)` in `[0, 1]`, masks `(batch, height, width)`. Models, latents and conditioning
//! are typed objects behind an `Arc`, so values clone in O(1) and the output cache can hold
//! them without copying.

use std::any::Any;
use std::fmt;
use std::sync::Arc;

use candle_core::Tensor;

/// One output (or input) value of a node.
#[derive(Clone)]
pub enum Value {
    Int(i64),
    Float(f64),
    String(Arc<str>),
    Boolean(bool),
    Image(Tensor),
    Mask(Tensor),
    /// Models, latents, conditioning: anything a family of nodes shares, downcast by type.
    Object(Arc<dyn Any + Send + Sync>),
}

impl Value {
    /// Wraps a typed object (a loaded model, a latent batch, conditioning).
    pub fn object<T: Any + Send + Sync>(value: T) -> Self {
        Value::Object(Arc::new(value))
    }

    /// A short name of the variant, for error messages.
    pub fn type_name(&self) -> &'static str {
        match self {
            Value::Int(_) => "INT",
            Value::Float(_) => "FLOAT",
            Value::String(_) => "STRING",
            Value::Boolean(_) => "BOOLEAN",
            Value::Image(_) => "IMAGE",
            Value::Mask(_) => "MASK",
            Value::Object(_) => "OBJECT",
        }
    }

    /// Rough resident size, for the output cache's byte budget.
    pub fn approx_bytes(&self) -> usize {
        match self {
            Value::Image(t) | Value::Mask(t) => t.elem_count() * t.dtype().size_in_bytes(),
            Value::String(s) => s.len(),
            // Objects are models or small state: the model cache accounts for model bytes.
            _ => 16,
        }
    }
}

impl fmt::Debug for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Int(v) => write!(f, "Int({v})"),
            Value::Float(v) => write!(f, "Float({v})"),
            Value::String(v) => write!(f, "String({v:?})"),
            Value::Boolean(v) => write!(f, "Boolean({v})"),
            Value::Image(t) => write!(f, "Image{:?}", t.dims()),
            Value::Mask(t) => write!(f, "Mask{:?}", t.dims()),
            Value::Object(_) => f.write_str("Object"),
        }
    }
}
