//! UniPC (Zhao et al. 2023): a multistep predictor with a corrector that reuses the model
//! evaluation of the next step, in data-prediction form, up to third order.
//!
//! It runs in the variance-preserving space, `x_vp = x / sqrt(1 + sigma²)`, where
//! `alpha = 1 / sqrt(1 + sigma²)`, `std = sigma alpha` and `lambda = -ln sigma`. The model's
//! clean estimate is the data prediction there unchanged. As in ComfyUI, a final sigma of 0
//! is treated as 0.001, and the order is `min(3, steps - 1)`.

use candle_core::Tensor;

use super::{Walk, lin};
use crate::error::{ModelError, Result};

/// The B(h) of the update: `h` (bh1) or `e^h - 1` (bh2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Variant {
    Bh1,
    Bh2,
}

/// Where the last sigma of a schedule ending at 0 is put, as ComfyUI does.
const LAST_SIGMA: f64 = 0.001;

fn alpha(sigma: f64) -> f64 {
    1.0 / (1.0 + sigma * sigma).sqrt()
}

/// One earlier point: its sigma and the model's clean estimate there.
struct Point {
    sigma: f64,
    estimate: Tensor,
}

pub(super) fn sample(walk: &mut Walk<'_>, x: Tensor, variant: Variant) -> Result<Tensor> {
    let mut sigmas = walk.sigmas.to_vec();
    if let Some(last) = sigmas.last_mut().filter(|s| **s == 0.0) {
        *last = LAST_SIGMA;
    }
    let steps = sigmas.len() - 1;
    let order = 3.min(steps.saturating_sub(1));
    let data = |w: &Walk<'_>, x_vp: &Tensor, sigma: f64| w.denoise(&(x_vp / alpha(sigma))?, sigma);
    let mut x = (x * alpha(sigmas[0]))?;
    let mut history: Vec<Point> = Vec::with_capacity(order.max(1));
    for step in 0..steps {
        walk.check(step)?;
        if step == 0 {
            let estimate = data(walk, &x, sigmas[0])?;
            history.push(Point {
                sigma: sigmas[0],
                estimate,
            });
        } else if step < order {
            // Warm-up: the order grows with the history.
            let (next, estimate) = update(walk, &x, &history, sigmas[step], step, true, variant)?;
            x = next;
            history.push(Point {
                sigma: sigmas[step],
                estimate: estimate.expect("the corrector evaluates the model"),
            });
        } else {
            let last = if step == steps - 1 { steps } else { step };
            for (target, &sigma) in sigmas.iter().enumerate().take(last + 1).skip(step) {
                let step_order = order.min(steps + 1 - target);
                let correct = target != steps;
                let (next, estimate) =
                    update(walk, &x, &history, sigma, step_order, correct, variant)?;
                x = next;
                if !history.is_empty() {
                    history.remove(0);
                }
                if let Some(estimate) = estimate {
                    history.push(Point { sigma, estimate });
                }
            }
        }
        (walk.hooks.progress)(step + 1, steps);
    }
    Ok((x / alpha(sigmas[steps]))?)
}

/// One predictor step from the newest point of `history` to `sigma` with the `order - 1`
/// points before it, then, when `correct`, the corrector with the model's estimate at the
/// new point (returned, so the next step reuses it).
fn update(
    walk: &Walk<'_>,
    x: &Tensor,
    history: &[Point],
    sigma: f64,
    order: usize,
    correct: bool,
    variant: Variant,
) -> Result<(Tensor, Option<Tensor>)> {
    let newest = history
        .last()
        .expect("a model evaluation before any update");
    let h = newest.sigma.ln() - sigma.ln();
    // Ratios of the earlier points' lambda steps to this one, and their divided differences.
    let mut ratios = Vec::with_capacity(order);
    let mut differences = Vec::with_capacity(order);
    for point in history.iter().rev().skip(1).take(order.saturating_sub(1)) {
        let ratio = (newest.sigma.ln() - point.sigma.ln()) / h;
        differences.push(((&point.estimate - &newest.estimate)? / ratio)?);
        ratios.push(ratio);
    }
    ratios.push(1.0);
    let hh = -h;
    let h_phi_1 = hh.exp_m1();
    let b_h = match variant {
        Variant::Bh1 => hh,
        Variant::Bh2 => hh.exp_m1(),
    };
    // R[i][k] = ratio_k^i, b_i = i! h phi_(i+1)(h) / B(h).
    let mut rows = Vec::with_capacity(order);
    let mut rhs = Vec::with_capacity(order);
    let mut h_phi_k = h_phi_1 / hh - 1.0;
    let mut factorial = 1.0;
    for i in 1..=order {
        rows.push(
            ratios
                .iter()
                .map(|r| r.powi(i as i32 - 1))
                .collect::<Vec<_>>(),
        );
        rhs.push(h_phi_k * factorial / b_h);
        factorial *= (i + 1) as f64;
        h_phi_k = h_phi_k / hh - 1.0 / factorial;
    }
    let alpha_t = alpha(sigma);
    let std_ratio = (sigma * alpha_t) / (newest.sigma * alpha(newest.sigma));
    let base = lin(x, std_ratio, &newest.estimate, -alpha_t * h_phi_1)?;
    let predictor = if differences.is_empty() {
        Vec::new()
    } else if order == 2 {
        vec![0.5]
    } else {
        solve(leading(&rows, order - 1), &rhs[..order - 1])?
    };
    let mut x_t = base.clone();
    for (rho, difference) in predictor.iter().zip(&differences) {
        x_t = (x_t - (difference * (alpha_t * b_h * rho))?)?;
    }
    if !correct {
        return Ok((x_t, None));
    }
    let estimate = walk.denoise(&(&x_t / alpha_t)?, sigma)?;
    let corrector = if order == 1 {
        vec![0.5]
    } else {
        solve(rows.clone(), &rhs)?
    };
    let (own, earlier) = corrector.split_last().expect("at least one coefficient");
    let mut correction = ((&estimate - &newest.estimate)? * *own)?;
    for (rho, difference) in earlier.iter().zip(&differences) {
        correction = (correction + (difference * *rho)?)?;
    }
    let x_t = (base - (correction * (alpha_t * b_h))?)?;
    Ok((x_t, Some(estimate)))
}

/// The top-left `n x n` block.
fn leading(rows: &[Vec<f64>], n: usize) -> Vec<Vec<f64>> {
    rows[..n].iter().map(|row| row[..n].to_vec()).collect()
}

/// `A c = b` by Gaussian elimination with partial pivoting (at most 3 x 3 here).
fn solve(mut a: Vec<Vec<f64>>, b: &[f64]) -> Result<Vec<f64>> {
    let n = b.len();
    let mut b = b.to_vec();
    for col in 0..n {
        let pivot = (col..n)
            .max_by(|&i, &j| a[i][col].abs().total_cmp(&a[j][col].abs()))
            .expect("a non-empty column");
        if a[pivot][col].abs() < 1e-300 {
            return Err(ModelError::InvalidInput(
                "uni_pc: the sigmas give a singular system (repeated sigmas?)".into(),
            ));
        }
        a.swap(col, pivot);
        b.swap(col, pivot);
        let pivot_row = a[col].clone();
        for row in col + 1..n {
            let factor = a[row][col] / pivot_row[col];
            for (value, above) in a[row].iter_mut().zip(&pivot_row).skip(col) {
                *value -= factor * above;
            }
            b[row] -= factor * b[col];
        }
    }
    let mut c = vec![0.0; n];
    for row in (0..n).rev() {
        let tail: f64 = (row + 1..n).map(|k| a[row][k] * c[k]).sum();
        c[row] = (b[row] - tail) / a[row][row];
    }
    Ok(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn solve_inverts_a_small_system() {
        let a = vec![
            vec![2.0, 1.0, 0.0],
            vec![1.0, 3.0, 1.0],
            vec![0.0, 1.0, 4.0],
        ];
        let c = solve(a, &[3.0, 5.0, 5.0]).unwrap();
        for (got, want) in c.iter().zip([1.0, 1.0, 1.0]) {
            assert!((got - want).abs() < 1e-12, "{c:?}");
        }
    }
}
