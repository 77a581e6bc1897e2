//! The built-in nodes, one family per file, and the list that registers them.

mod animated;
mod clip_vision;
mod conditioning;
mod controlnet;
mod custom_sampling;
pub mod diffusion;
mod image;
mod inpaint;
mod interpolate;
mod mask;
mod math;
mod output;
mod preprocess;
mod resize;
mod stitch;
mod upscale;
mod utility;
mod video;

use crate::registry::NodeRegistry;

/// ComfyUI's `MAX_RESOLUTION`.
pub const MAX_RESOLUTION: i64 = 16384;

/// Registers every built-in node.
pub fn register_all(registry: &mut NodeRegistry) {
    diffusion::register(registry);
    custom_sampling::register(registry);
    conditioning::register(registry);
    controlnet::register(registry);
    clip_vision::register(registry);
    preprocess::register(registry);
    stitch::register(registry);
    math::register(registry);
    image::register(registry);
    resize::register(registry);
    mask::register(registry);
    inpaint::register(registry);
    output::register(registry);
    animated::register(registry);
    upscale::register(registry);
    interpolate::register(registry);
    utility::register(registry);
    video::register(registry);
}
