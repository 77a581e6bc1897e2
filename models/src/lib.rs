//! `sakuga-models`: the networks sakuga runs on candle, how their weights are found and
//! loaded, the cache that keeps them resident under a byte budget, and device probes.
//!
//! Module map:
//! - [`error`]: the crate's one error enum, [`ModelError`].

pub mod error;

pub use error::{ModelError, Result};
pub mod cache;
pub mod conv;
pub mod demo;
pub mod device;
pub mod diffusion;
pub mod interpolate;
pub mod store;
pub mod upscale;
