//! Port types: the type names that flow along links, spelled as ComfyUI spells them so that
//! exported workflows and `/object_info`-style catalogues read the same.

use std::fmt;

/// The type of a node input or output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PortType {
    Model,
    Clip,
    Vae,
    Conditioning,
    Latent,
    Image,
    Mask,
    UpscaleModel,
    InterpolationModel,
    /// A loaded ControlNet.
    ControlNet,
    /// A loaded CLIP vision encoder.
    ClipVision,
    /// An image encoded by CLIP vision (`CLIPVisionEncode`).
    ClipVisionOutput,
    /// A sampler's update rule (custom sampling).
    Sampler,
    /// A sigma schedule (custom sampling).
    Sigmas,
    /// The initial noise of a custom sampling run.
    Noise,
    /// A model with its conditioning and guidance (custom sampling).
    Guider,
    /// Frames with their rate (LoadVideo, CreateVideo).
    Video,
    /// Sound; sakuga carries only "no audio" (a video's missing track).
    Audio,
    Int,
    Float,
    String,
    Boolean,
    /// A choice from a list; carried as a string.
    Combo,
    /// Anything (`*`): a preview of any value.
    Any,
    /// Whatever type is linked in, passed on as that type (ComfyUI's `MatchType`, the
    /// switch's inputs and output).
    MatchType,
}

impl PortType {
    /// ComfyUI's spelling of the type.
    pub const fn as_str(self) -> &'static str {
        match self {
            PortType::Model => "MODEL",
            PortType::Clip => "CLIP",
            PortType::Vae => "VAE",
            PortType::Conditioning => "CONDITIONING",
            PortType::Latent => "LATENT",
            PortType::Image => "IMAGE",
            PortType::Mask => "MASK",
            PortType::UpscaleModel => "UPSCALE_MODEL",
            PortType::InterpolationModel => "INTERP_MODEL",
            PortType::ControlNet => "CONTROL_NET",
            PortType::ClipVision => "CLIP_VISION",
            PortType::ClipVisionOutput => "CLIP_VISION_OUTPUT",
            PortType::Sampler => "SAMPLER",
            PortType::Sigmas => "SIGMAS",
            PortType::Noise => "NOISE",
            PortType::Guider => "GUIDER",
            PortType::Video => "VIDEO",
            PortType::Audio => "AUDIO",
            PortType::Int => "INT",
            PortType::Float => "FLOAT",
            PortType::String => "STRING",
            PortType::Boolean => "BOOLEAN",
            PortType::Combo => "COMBO",
            PortType::Any => "*",
            PortType::MatchType => "COMFY_MATCHTYPE_V3",
        }
    }

    /// Whether a link from an output of type `self` may feed an input of type `input`.
    /// A combo input accepts a string output, as ComfyUI's primitive nodes rely on.
    /// A wildcard on either side matches anything: its real type is only known at run
    /// time, where a mismatch is the consuming node's clear input-type error.
    pub fn feeds(self, input: PortType) -> bool {
        self == input
            || self.is_wildcard()
            || input.is_wildcard()
            || (self == PortType::String && input == PortType::Combo)
    }

    /// Any and MatchType: the real type is known only at run time.
    pub fn is_wildcard(self) -> bool {
        matches!(self, PortType::Any | PortType::MatchType)
    }
}

impl fmt::Display for PortType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
