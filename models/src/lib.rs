//! `sakuga-models`: the networks sakuga runs on candle, how their weights are found and
//! loaded, the cache that keeps them resident under a byte budget, and device probes.
//!
//! Module map:
//! - [`error`]: the crate's one error enum, [`ModelError`].

pub mod error;

pub use error::{ModelError, Result};

/// Asked before each piece of a long model call (a VAE tile or decoder block, an upscaler
/// tile) with the piece's number from 0 and the number of pieces; `false` stops the call
/// with [`ModelError::Cancelled`]. This is how a job's cancel and run-time limit reach
/// inside a node.
pub type Proceed<'a> = &'a dyn Fn(usize, usize) -> bool;

/// A [`Proceed`] that never stops.
pub fn never_stop(_: usize, _: usize) -> bool {
    true
}

/// Asks `proceed` about piece `step` of `steps`.
///
/// # Errors
/// [`ModelError::Cancelled`] when it says stop.
pub fn check_proceed(proceed: Proceed<'_>, step: usize, steps: usize) -> Result<()> {
    if proceed(step, steps) {
        Ok(())
    } else {
        Err(ModelError::Cancelled {
            step: step + 1,
            steps,
        })
    }
}
pub mod cache;
pub mod conv;
pub mod demo;
pub mod device;
pub mod diffusion;
pub mod interpolate;
pub mod selftest;
pub mod store;
pub mod upscale;
