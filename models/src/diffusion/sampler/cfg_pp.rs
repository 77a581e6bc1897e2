//! CFG++ samplers: they step along the negative prompt's estimate (the "unconditional"
//! one) instead of the guided one, which keeps guidance from pushing the latent off the
//! data manifold at high CFG (ComfyUI's `*_cfg_pp` samplers). On the variance-exploding
//! schedules sakuga runs, alpha is 1.

use candle_core::Tensor;

use super::{Walk, ancestral_split, lin};
use crate::error::Result;

/// Euler (ancestral with `eta` 1, plain with 0) along the unconditional slope.
pub(super) fn euler(walk: &mut Walk<'_>, x: Tensor, eta: f64) -> Result<Tensor> {
    walk.each_step(x, |w, _, x, s, sn| {
        let (denoised, uncond) = w.denoiser.denoise_with_uncond(&x, s)?;
        if sn == 0.0 {
            return Ok(denoised);
        }
        let d = ((&x - &uncond)? / s)?;
        let (down, up) = if eta > 0.0 {
            ancestral_split(s, sn)
        } else {
            (sn, 0.0)
        };
        let x = (&denoised + (d * down)?)?;
        if eta > 0.0 {
            return w.add_noise(x, up);
        }
        Ok(x)
    })
}

/// DPM-Solver++(2M) with the unconditional estimate as the history term.
pub(super) fn dpmpp_2m(walk: &mut Walk<'_>, x: Tensor) -> Result<Tensor> {
    let sigmas = walk.sigmas.to_vec();
    let mut old_uncond: Option<Tensor> = None;
    walk.each_step(x, |w, i, x, s, sn| {
        let (denoised, uncond) = w.denoiser.denoise_with_uncond(&x, s)?;
        let (t, t_next) = (-s.ln(), -sn.ln());
        let h = t_next - t;
        let decay = (-h).exp();
        let mix = match &old_uncond {
            Some(old) if sn != 0.0 => {
                let r = (t + sigmas[i - 1].ln()) / h;
                let correction = lin(&denoised, 1.0, old, -1.0)?;
                lin(&uncond, -decay, &correction, -(-h).exp_m1() / (2.0 * r))?
            }
            _ => (&uncond * -decay)?,
        };
        let next = ((denoised + mix)? + (&x * decay)?)?;
        old_uncond = Some(uncond);
        Ok(next)
    })
}

/// DPM-Solver++(2S) ancestral, its input shifted by the guidance (`denoised - uncond`) and
/// its midpoint fixed at half the step, as ComfyUI's `dpmpp_2s_ancestral_cfg_pp`.
pub(super) fn dpmpp_2s_ancestral(walk: &mut Walk<'_>, x: Tensor) -> Result<Tensor> {
    walk.each_step(x, |w, _, x, s, sn| {
        let (denoised, uncond) = w.denoiser.denoise_with_uncond(&x, s)?;
        let (down, up) = ancestral_split(s, sn);
        let x = if down == 0.0 {
            denoised
        } else {
            let (t, t_next) = (-s.ln(), -down.ln());
            let h = t_next - t;
            let mid = (-(t + 0.5 * h)).exp();
            let shifted = ((&x + &denoised)? - &uncond)?;
            let x_2 = lin(&shifted, mid / s, &denoised, -(-0.5 * h).exp_m1())?;
            // ComfyUI's hook has by now replaced the negative's estimate with the midpoint's,
            // and its second shift reads that one.
            let (denoised_2, uncond_2) = w.denoiser.denoise_with_uncond(&x_2, mid)?;
            let shifted = ((&x + &denoised)? - &uncond_2)?;
            lin(&shifted, down / s, &denoised_2, -(-h).exp_m1())?
        };
        w.renoise(x, sn, up)
    })
}
