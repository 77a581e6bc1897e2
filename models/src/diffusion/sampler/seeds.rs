//! Exponential-integrator samplers in data prediction and log-SNR time: SEEDS-2 and SEEDS-3
//! (stochastic explicit exponential derivative-free solvers) with the deterministic and
//! stochastic exponential Heun methods that are SEEDS-2 settings, and Heun++ (ComfyUI's
//! `heunpp2`). On the variance-exploding schedules sakuga runs, the half log-SNR is
//! `-ln sigma` and alpha is 1.

use candle_core::Tensor;

use super::{Walk, lin, toward};
use crate::error::Result;

/// SEEDS-2's second stage: its two estimates averaged (phi_1) or weighted as the second
/// order exponential integrator weighs them (phi_2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Phi {
    One,
    Two,
}

/// `h phi_1(h)`: `e^h - 1`.
fn phi_1(h: f64) -> f64 {
    h.exp_m1()
}

/// `h phi_2(h)`: `(e^h - 1 - h) / h`.
fn phi_2(h: f64) -> f64 {
    (h.exp_m1() - h) / h
}

/// Noise standard deviation of an SDE segment whose log-SNR advances by `r * h` with `eta`.
fn segment_noise(r: f64, h: f64, eta: f64) -> f64 {
    (-(-2.0 * r * h * eta).exp_m1()).sqrt()
}

/// The SDE noise carried into the next segment (its log-SNR advancing by `factor / eta`):
/// the old draw decayed, topped up with a fresh one.
fn carry(w: &mut Walk<'_>, like: &Tensor, sde: &Tensor, factor: f64) -> Result<Tensor> {
    let fresh = w.noise.draw(like)?;
    lin(sde, factor.exp(), &fresh, (-(2.0 * factor).exp_m1()).sqrt())
}

/// Both SEEDS methods' first stage: from `sigmas[0]` to the intermediate `sigmas[1]` at
/// fraction `r` of the step's log-SNR `h`, and the SDE noise it drew (with `eta` > 0).
fn first_stage(
    w: &mut Walk<'_>,
    x: &Tensor,
    denoised: &Tensor,
    [s, s_1]: [f64; 2],
    r: f64,
    h: f64,
    eta: f64,
) -> Result<(Tensor, Option<Tensor>)> {
    let x_2 = lin(
        x,
        s_1 / s * (-r * h * eta).exp(),
        denoised,
        -phi_1(-r * h * (eta + 1.0)),
    )?;
    if eta <= 0.0 {
        return Ok((x_2, None));
    }
    let draw = (w.noise.draw(x)? * segment_noise(r, h, eta))?;
    Ok(((x_2 + (&draw * s_1)?)?, Some(draw)))
}

/// SEEDS-2 with stage fraction `r`; `eta` 0 is deterministic.
pub(super) fn seeds_2(
    walk: &mut Walk<'_>,
    x: Tensor,
    eta: f64,
    r: f64,
    phi: Phi,
) -> Result<Tensor> {
    walk.each_step(x, |w, _, x, s, sn| {
        let denoised = w.denoise(&x, s)?;
        if sn == 0.0 {
            return Ok(denoised);
        }
        let h = s.ln() - sn.ln();
        let h_eta = h * (eta + 1.0);
        let s_1 = (-(-s.ln() + r * h)).exp();
        let (x_2, sde) = first_stage(w, &x, &denoised, [s, s_1], r, h, eta)?;
        let denoised_2 = w.denoise(&x_2, s_1)?;
        let decay = sn / s * (-h * eta).exp();
        let mut next = match phi {
            Phi::One => {
                let averaged = lin(
                    &denoised,
                    1.0 - 1.0 / (2.0 * r),
                    &denoised_2,
                    1.0 / (2.0 * r),
                )?;
                lin(&x, decay, &averaged, -phi_1(-h_eta))?
            }
            Phi::Two => {
                let b2 = phi_2(-h_eta) / r;
                let b1 = phi_1(-h_eta) - b2;
                let mixed = lin(&denoised, b1, &denoised_2, b2)?;
                lin(&x, decay, &mixed, -1.0)?
            }
        };
        if let Some(sde) = sde {
            next = (next + (carry(w, &x, &sde, (r - 1.0) * h * eta)? * sn)?)?;
        }
        Ok(next)
    })
}

/// SEEDS-3 with stage fractions 1/3 and 2/3.
pub(super) fn seeds_3(walk: &mut Walk<'_>, x: Tensor, eta: f64) -> Result<Tensor> {
    const R_1: f64 = 1.0 / 3.0;
    const R_2: f64 = 2.0 / 3.0;
    walk.each_step(x, |w, _, x, s, sn| {
        let denoised = w.denoise(&x, s)?;
        if sn == 0.0 {
            return Ok(denoised);
        }
        let h = s.ln() - sn.ln();
        let h_eta = h * (eta + 1.0);
        let sigma_at = |r: f64| (-(-s.ln() + r * h)).exp();
        let (s_1, s_2) = (sigma_at(R_1), sigma_at(R_2));
        let (x_2, mut sde) = first_stage(w, &x, &denoised, [s, s_1], R_1, h, eta)?;
        let denoised_2 = w.denoise(&x_2, s_1)?;
        let a3_2 = R_2 / R_1 * phi_2(-R_2 * h_eta);
        let a3_1 = phi_1(-R_2 * h_eta) - a3_2;
        let mixed = lin(&denoised, a3_1, &denoised_2, a3_2)?;
        let mut x_3 = lin(&x, s_2 / s * (-R_2 * h * eta).exp(), &mixed, -1.0)?;
        if let Some(previous) = sde.take() {
            let next = carry(w, &x, &previous, (R_1 - R_2) * h * eta)?;
            x_3 = (x_3 + (&next * s_2)?)?;
            sde = Some(next);
        }
        let denoised_3 = w.denoise(&x_3, s_2)?;
        let b3 = phi_2(-h_eta) / R_2;
        let b1 = phi_1(-h_eta) - b3;
        let mixed = lin(&denoised, b1, &denoised_3, b3)?;
        let mut next = lin(&x, sn / s * (-h * eta).exp(), &mixed, -1.0)?;
        if let Some(previous) = sde {
            next = (next + (carry(w, &x, &previous, (R_2 - 1.0) * h * eta)? * sn)?)?;
        }
        Ok(next)
    })
}

/// Heun++ (s_churn 0): Euler at the last step, Heun with a weighted slope at the one before,
/// and a three-point weighted slope elsewhere. ComfyUI draws (and, without churn, ignores)
/// one noise tensor per step; so does this, so the noise stream stays in step.
pub(super) fn heunpp2(walk: &mut Walk<'_>, x: Tensor) -> Result<Tensor> {
    let sigmas = walk.sigmas.to_vec();
    let (first, last) = (sigmas[0], sigmas[sigmas.len() - 1]);
    walk.each_step(x, |w, i, x, s, sn| {
        w.noise.draw(&x)?;
        let denoised = w.denoise(&x, s)?;
        let d = ((&x - &denoised)? / s)?;
        let dt = sn - s;
        if sn == last {
            return toward(&x, &denoised, s, sn);
        }
        let x_2 = (&x + (&d * dt)?)?;
        let d_2 = ((&x_2 - w.denoise(&x_2, sn)?)? / sn)?;
        let slope = if sigmas[i + 2] == last {
            let w2 = sn / (2.0 * first);
            lin(&d, 1.0 - w2, &d_2, w2)?
        } else {
            let s_3 = sigmas[i + 2];
            let x_3 = (&x_2 + (&d_2 * (s_3 - sn))?)?;
            let d_3 = ((&x_3 - w.denoise(&x_3, s_3)?)? / s_3)?;
            let (w2, w3) = (sn / (3.0 * first), s_3 / (3.0 * first));
            (lin(&d, 1.0 - w2 - w3, &d_2, w2)? + (d_3 * w3)?)?
        };
        Ok((&x + (slope * dt)?)?)
    })
}
