//! Samplers that reuse earlier steps' model outputs: linear multistep, iPNDM, the
//! DPM-Solver++ multistep family and RES multistep. One model evaluation per step; the
//! history makes the later steps higher order.

use std::collections::VecDeque;

use candle_core::Tensor;

use super::{Walk, ancestral_split, lin, toward};
use crate::error::Result;

/// Linear multistep (order 4): the ODE's slopes at the last steps, weighted by the
/// integrals of their Lagrange basis polynomials over the step.
pub(super) fn lms(walk: &mut Walk<'_>, x: Tensor) -> Result<Tensor> {
    const ORDER: usize = 4;
    let sigmas = walk.sigmas;
    let mut slopes: VecDeque<Tensor> = VecDeque::with_capacity(ORDER + 1);
    walk.each_step(x, |w, i, x, s, sn| {
        let denoised = w.denoise(&x, s)?;
        slopes.push_back(((&x - &denoised)? / s)?);
        if slopes.len() > ORDER {
            slopes.pop_front();
        }
        if sn == 0.0 {
            return Ok(denoised);
        }
        let order = (i + 1).min(ORDER);
        let mut x = x;
        // Newest slope first: basis j belongs to node i - j.
        for (j, slope) in slopes.iter().rev().enumerate().take(order) {
            let coefficient = lagrange_integral(sigmas, i, j, order);
            x = (x + (slope * coefficient)?)?;
        }
        Ok(x)
    })
}

/// `∫ L_j(τ) dτ` over `[t_i, t_i+1]`, `L_j` the Lagrange basis polynomial of node `t_i-j`
/// among `t_i .. t_i-order+1`. Three-point Gauss-Legendre is exact: `L_j` has degree < 4.
fn lagrange_integral(t: &[f64], i: usize, j: usize, order: usize) -> f64 {
    let basis = |tau: f64| {
        (0..order)
            .filter(|&k| k != j)
            .map(|k| (tau - t[i - k]) / (t[i - j] - t[i - k]))
            .product::<f64>()
    };
    let (a, b) = (t[i], t[i + 1]);
    let (mid, half) = ((a + b) / 2.0, (b - a) / 2.0);
    let node = (3.0f64 / 5.0).sqrt();
    half * (5.0 / 9.0 * basis(mid - half * node)
        + 8.0 / 9.0 * basis(mid)
        + 5.0 / 9.0 * basis(mid + half * node))
}

/// Improved PNDM: Adams-Bashforth on the slopes, up to fourth order.
pub(super) fn ipndm(walk: &mut Walk<'_>, x: Tensor) -> Result<Tensor> {
    const MAX_ORDER: usize = 4;
    // Older slopes, newest last.
    let mut history: VecDeque<Tensor> = VecDeque::with_capacity(MAX_ORDER);
    walk.each_step(x, |w, i, x, s, sn| {
        let denoised = w.denoise(&x, s)?;
        let d = ((&x - &denoised)? / s)?;
        let dt = sn - s;
        let back = |k: usize| &history[history.len() - k];
        let next = if sn == 0.0 {
            denoised
        } else {
            let slope = match (i + 1).min(MAX_ORDER) {
                1 => d.clone(),
                2 => lin(&d, 1.5, back(1), -0.5)?,
                3 => (lin(&d, 23.0 / 12.0, back(1), -16.0 / 12.0)? + (back(2) * (5.0 / 12.0))?)?,
                _ => {
                    let newer = lin(&d, 55.0 / 24.0, back(1), -59.0 / 24.0)?;
                    (newer + lin(back(2), 37.0 / 24.0, back(3), -9.0 / 24.0)?)?
                }
            };
            (&x + (slope * dt)?)?
        };
        if history.len() == MAX_ORDER - 1 {
            history.pop_front();
        }
        history.push_back(d);
        Ok(next)
    })
}

/// iPNDM with variable step sizes (ComfyUI's `ipndm_v`): the Adams-Bashforth weights of
/// [`ipndm`] recomputed from the actual sigma gaps, up to fourth order.
pub(super) fn ipndm_v(walk: &mut Walk<'_>, x: Tensor) -> Result<Tensor> {
    const MAX_ORDER: usize = 4;
    let t = walk.sigmas.to_vec();
    let mut history: VecDeque<Tensor> = VecDeque::with_capacity(MAX_ORDER);
    walk.each_step(x, |w, i, x, s, sn| {
        let denoised = w.denoise(&x, s)?;
        let d = ((&x - &denoised)? / s)?;
        let back = |k: usize| &history[history.len() - k];
        let next = if sn == 0.0 {
            denoised
        } else {
            let coefficients = variable_ab_weights(&t, i, (i + 1).min(MAX_ORDER));
            let mut slope = (&d * coefficients[0])?;
            for (k, c) in coefficients.iter().enumerate().skip(1) {
                slope = (slope + (back(k) * *c)?)?;
            }
            (&x + (slope * (sn - s))?)?
        };
        if history.len() == MAX_ORDER - 1 {
            history.pop_front();
        }
        history.push_back(d);
        Ok(next)
    })
}

/// Weights of this step's slope and the `order - 1` before it, newest first, for the gaps
/// between sigmas `t` around step `i` (ComfyUI's `sample_ipndm_v`).
fn variable_ab_weights(t: &[f64], i: usize, order: usize) -> Vec<f64> {
    if order == 1 {
        return vec![1.0];
    }
    let h = t[i + 1] - t[i];
    let h1 = t[i] - t[i - 1];
    let base = [(2.0 + h / h1) / 2.0, -(h / h1) / 2.0];
    if order == 2 {
        return base.to_vec();
    }
    let h2 = t[i - 1] - t[i - 2];
    let temp1 = (1.0 - h / (3.0 * (h + h1)) * (h * (h + h1)) / (h1 * (h1 + h2))) / 2.0;
    if order == 3 {
        return vec![
            base[0] + temp1,
            base[1] - (1.0 + h1 / h2) * temp1,
            temp1 * h1 / h2,
        ];
    }
    let h3 = t[i - 2] - t[i - 3];
    let temp2 = ((1.0 - h / (3.0 * (h + h1))) / 2.0
        + (1.0 - h / (2.0 * (h + h1))) * h / (6.0 * (h + h1 + h2)))
        * (h * (h + h1) * (h + h1 + h2))
        / (h1 * (h1 + h2) * (h1 + h2 + h3));
    let ratio = h1 * (h1 + h2) / (h2 * (h2 + h3));
    vec![
        base[0] + temp1 + temp2,
        base[1] - (1.0 + h1 / h2) * temp1 - (1.0 + h1 / h2 + ratio) * temp2,
        temp1 * h1 / h2 + (h1 / h2 + ratio * (1.0 + h2 / h3)) * temp2,
        -temp2 * ratio * h1 / h2,
    ]
}

/// DPM-Solver++(2M): the exponential-integrator step with a second-order blend of this and
/// the previous estimate.
pub(super) fn dpmpp_2m(walk: &mut Walk<'_>, x: Tensor) -> Result<Tensor> {
    let sigmas = walk.sigmas;
    let mut previous: Option<Tensor> = None;
    walk.each_step(x, |w, i, x, s, sn| {
        let denoised = w.denoise(&x, s)?;
        let next = if sn == 0.0 {
            denoised.clone()
        } else {
            let h = s.ln() - sn.ln();
            let blend = match &previous {
                Some(old) => {
                    let r = (sigmas[i - 1].ln() - s.ln()) / h;
                    lin(&denoised, 1.0 + 1.0 / (2.0 * r), old, -1.0 / (2.0 * r))?
                }
                None => denoised.clone(),
            };
            lin(&x, sn / s, &blend, -(-h).exp_m1())?
        };
        previous = Some(denoised);
        Ok(next)
    })
}

/// The DPM-Solver++ SDE step's first-order part from `s` to `sn` (eta = 1): `h`, `h * 2`
/// and `x` moved along the estimate, before the multistep corrections and the noise.
fn sde_first_order(x: &Tensor, denoised: &Tensor, s: f64, sn: f64) -> Result<(f64, f64, Tensor)> {
    let h = s.ln() - sn.ln();
    let h_eta = 2.0 * h;
    let next = lin(x, sn / s * (-h).exp(), denoised, -(-h_eta).exp_m1())?;
    Ok((h, h_eta, next))
}

/// DPM-Solver++(2M) SDE, eta = 1, with the midpoint or Heun correction.
pub(super) fn dpmpp_2m_sde(walk: &mut Walk<'_>, x: Tensor, heun: bool) -> Result<Tensor> {
    let mut previous: Option<(Tensor, f64)> = None;
    walk.each_step(x, |w, _, x, s, sn| {
        let denoised = w.denoise(&x, s)?;
        if sn == 0.0 {
            return Ok(denoised);
        }
        let (h, h_eta, mut next) = sde_first_order(&x, &denoised, s, sn)?;
        let phi = -(-h_eta).exp_m1();
        if let Some((old, h_last)) = &previous {
            let r = h_last / h;
            let weight = if heun {
                (phi / -h_eta + 1.0) / r
            } else {
                0.5 * phi / r
            };
            next = (next + ((&denoised - old)? * weight)?)?;
        }
        let next = w.add_noise(next, sn * (-(-2.0 * h).exp_m1()).sqrt())?;
        previous = Some((denoised, h));
        Ok(next)
    })
}

/// DPM-Solver++(3M) SDE, eta = 1: second and third order corrections from the last two
/// estimates once there are that many.
pub(super) fn dpmpp_3m_sde(walk: &mut Walk<'_>, x: Tensor) -> Result<Tensor> {
    // (estimate, h) of the previous step and the one before it.
    let mut last: Option<(Tensor, f64)> = None;
    let mut before: Option<(Tensor, f64)> = None;
    walk.each_step(x, |w, _, x, s, sn| {
        let denoised = w.denoise(&x, s)?;
        if sn == 0.0 {
            return Ok(denoised);
        }
        let (h, h_eta, mut next) = sde_first_order(&x, &denoised, s, sn)?;
        let phi_2 = (-h_eta).exp_m1() / h_eta + 1.0;
        match (&last, &before) {
            (Some((d1, h1)), Some((d2, h2))) => {
                let (r0, r1) = (h1 / h, h2 / h);
                let d1_0 = ((&denoised - d1)? / r0)?;
                let d1_1 = ((d1 - d2)? / r1)?;
                let spread = (&d1_0 - &d1_1)?;
                let first = (&d1_0 + (&spread * (r0 / (r0 + r1)))?)?;
                let second = (spread / (r0 + r1))?;
                let phi_3 = phi_2 / h_eta - 0.5;
                next = (next + lin(&first, phi_2, &second, -phi_3)?)?;
            }
            (Some((d1, h1)), None) => {
                let d = ((&denoised - d1)? / (h1 / h))?;
                next = (next + (d * phi_2)?)?;
            }
            _ => {}
        }
        let next = w.add_noise(next, sn * (-(-2.0 * h).exp_m1()).sqrt())?;
        before = last.take();
        last = Some((denoised, h));
        Ok(next)
    })
}

/// RES multistep (second order, arXiv 2308.02157), deterministic or ancestral (eta = 1).
pub(super) fn res_multistep(
    walk: &mut Walk<'_>,
    x: Tensor,
    ancestral: bool,
    cfg_pp: bool,
) -> Result<Tensor> {
    let sigmas = walk.sigmas;
    // The previous estimate (the negative prompt's, with CFG++) and the sigma its step went
    // down to.
    let mut previous: Option<(Tensor, f64)> = None;
    walk.each_step(x, |w, i, x, s, sn| {
        let (denoised, along) = if cfg_pp {
            w.denoiser.denoise_with_uncond(&x, s)?
        } else {
            let denoised = w.denoise(&x, s)?;
            (denoised.clone(), denoised)
        };
        let (down, up) = if ancestral {
            ancestral_split(s, sn)
        } else {
            (sn, 0.0)
        };
        // CFG++ moves the latent by the guidance first and steps along the negative's
        // estimate.
        let shifted = if cfg_pp {
            ((&x + &denoised)? - &along)?
        } else {
            x.clone()
        };
        let next = match &previous {
            Some((old, old_down)) if down != 0.0 => {
                let h = s.ln() - down.ln();
                let c2 = (old_down.ln() - sigmas[i - 1].ln()) / h;
                let phi1 = (-h).exp_m1() / -h;
                let phi2 = (phi1 - 1.0) / -h;
                let finite = |v: f64| if v.is_nan() { 0.0 } else { v };
                let (b1, b2) = (finite(phi1 - phi2 / c2), finite(phi2 / c2));
                let estimate = lin(&along, h * b1, old, h * b2)?;
                ((&shifted * (-h).exp())? + estimate)?
            }
            _ if cfg_pp => (&denoised + (((&x - &along)? / s)? * down)?)?,
            _ => toward(&x, &denoised, s, down)?,
        };
        let next = if ancestral {
            w.renoise(next, sn, up)?
        } else {
            next
        };
        previous = Some((along, down));
        Ok(next)
    })
}

/// Gradient estimation (ge_gamma 2): Euler, corrected by the change of slope since the
/// last step, `(gamma - 1) (d - d_prev) dt`.
pub(super) fn gradient_estimation(walk: &mut Walk<'_>, x: Tensor, cfg_pp: bool) -> Result<Tensor> {
    const GAMMA: f64 = 2.0;
    let mut previous: Option<Tensor> = None;
    walk.each_step(x, |w, i, x, s, sn| {
        // CFG++ takes the slope from the negative prompt's own estimate.
        let (denoised, slope_from) = if cfg_pp {
            w.denoiser.denoise_with_uncond(&x, s)?
        } else {
            let denoised = w.denoise(&x, s)?;
            (denoised.clone(), denoised)
        };
        let d = ((&x - &slope_from)? / s)?;
        let dt = sn - s;
        let next = if sn == 0.0 {
            denoised
        } else {
            let x = if cfg_pp {
                (&denoised + (&d * sn)?)?
            } else {
                (&x + (&d * dt)?)?
            };
            match (&previous, i >= 1) {
                (Some(old), true) => (&x + ((&d - old)? * ((GAMMA - 1.0) * dt))?)?,
                _ => x,
            }
        };
        previous = Some(d);
        Ok(next)
    })
}

/// The ER-SDE solver's noise scaler, `x (e^(x^0.3) + 10)`.
fn er_sde_scaler(x: f64) -> f64 {
    x * (x.powf(0.3).exp() + 10.0)
}

/// Extended reverse-time SDE solver, 3 stages (ComfyUI's `er_sde`, s_noise 1). On a
/// variance-exploding schedule its lambda is sigma itself and alpha is 1; the stage 2 and
/// 3 integrals are ComfyUI's 200-point Riemann sums, in f32 where ComfyUI's points are.
pub(super) fn er_sde(walk: &mut Walk<'_>, x: Tensor) -> Result<Tensor> {
    const POINTS: usize = 200;
    const MAX_STAGE: usize = 3;
    let lambdas: Vec<f64> = walk.sigmas.to_vec();
    let mut old_denoised: Option<Tensor> = None;
    let mut old_denoised_d: Option<Tensor> = None;
    walk.each_step(x, |w, i, x, s, sn| {
        let denoised = w.denoise(&x, s)?;
        let stage = (i + 1).min(MAX_STAGE);
        let next = if sn == 0.0 {
            denoised.clone()
        } else {
            let (ls, lt) = (lambdas[i], lambdas[i + 1]);
            let r = er_sde_scaler(lt) / er_sde_scaler(ls);
            let mut x = lin(&x, r, &denoised, 1.0 - r)?;
            if stage >= 2 {
                let dt = lt - ls;
                let step = -dt / POINTS as f64;
                // ComfyUI's points are an f32 tensor, so the positions and their scalers are
                // f32 arithmetic; the sums are taken wider.
                let positions: Vec<f32> = (0..POINTS)
                    .map(|k| lt as f32 + k as f32 * step as f32)
                    .collect();
                let scaled: Vec<f32> = positions
                    .iter()
                    .map(|&p| p * (p.powf(0.3).exp() + 10.0))
                    .collect();
                let integral: f64 = scaled.iter().map(|&v| f64::from(1.0 / v)).sum::<f64>() * step;
                let old = old_denoised
                    .as_ref()
                    .expect("a second stage has a previous step");
                let denoised_d = ((&denoised - old)? / (ls - lambdas[i - 1]))?;
                x = (&x + (&denoised_d * (dt + integral * er_sde_scaler(lt)))?)?;
                if stage >= 3 {
                    let integral_u: f64 = positions
                        .iter()
                        .zip(&scaled)
                        .map(|(&p, &v)| f64::from((p - ls as f32) / v))
                        .sum::<f64>()
                        * step;
                    let old_d = old_denoised_d
                        .as_ref()
                        .expect("a third stage has two previous steps");
                    let denoised_u = ((&denoised_d - old_d)? / ((ls - lambdas[i - 2]) / 2.0))?;
                    x = (&x + (denoised_u * (dt * dt / 2.0 + integral_u * er_sde_scaler(lt)))?)?;
                }
                old_denoised_d = Some(denoised_d);
            }
            let spread = (lt * lt - ls * ls * r * r).sqrt();
            let spread = if spread.is_nan() { 0.0 } else { spread };
            w.add_noise(x, spread)?
        };
        old_denoised = Some(denoised);
        Ok(next)
    })
}
