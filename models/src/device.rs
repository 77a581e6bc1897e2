//! Device probes: what the device sampler in `sakuga-telemetry` polls for memory and load.
//!
//! [`CpuProbe`] reads system memory and this process's CPU share through sysinfo.
//! [`CudaProbe`] reads a GPU through NVML (memory and utilization, no CUDA context needed)
//! and falls back to the CUDA driver API (cudarc) for memory when NVML is absent. Both
//! libraries are loaded at run time, so every build carries the CUDA probe and a machine
//! without a driver simply gets the CPU probe from [`probe_for`].

use std::sync::Arc;

use parking_lot::Mutex;
use sakuga_telemetry::{DeviceProbe, DeviceSample};
use sysinfo::{Pid, ProcessRefreshKind, ProcessesToUpdate, System};

use crate::error::{ModelError, Result};

/// System RAM and this process's CPU share.
#[derive(Debug)]
pub struct CpuProbe {
    /// `None` when sysinfo cannot read this platform; samples then read zero.
    system: Option<Mutex<System>>,
    pid: Option<Pid>,
    cores: f64,
    last_rss_bytes: Mutex<u64>,
}

impl CpuProbe {
    pub fn new() -> Self {
        CpuProbe {
            system: System::new().ok().map(Mutex::new),
            pid: sysinfo::get_current_pid().ok(),
            cores: std::thread::available_parallelism().map_or(1.0, |n| n.get() as f64),
            last_rss_bytes: Mutex::new(0),
        }
    }

    /// Resident set size of this process at the last sample.
    pub fn last_process_rss_bytes(&self) -> u64 {
        *self.last_rss_bytes.lock()
    }
}

impl Default for CpuProbe {
    fn default() -> Self {
        Self::new()
    }
}

impl DeviceProbe for CpuProbe {
    fn device(&self) -> String {
        "cpu".to_owned()
    }

    fn sample(&self) -> DeviceSample {
        let Some(system) = &self.system else {
            return DeviceSample {
                device: self.device(),
                memory_used_bytes: 0,
                memory_total_bytes: 0,
                utilization_ratio: 0.0,
            };
        };
        let mut system = system.lock();
        system.refresh_memory();
        let mut utilization = 0.0;
        if let Some(pid) = self.pid {
            system.refresh_processes_specifics(
                ProcessesToUpdate::Some(&[pid]),
                true,
                ProcessRefreshKind::nothing().with_memory().with_cpu(),
            );
            if let Some(process) = system.process(pid) {
                *self.last_rss_bytes.lock() = process.memory();
                // sysinfo reports percent of one core; the device is all of them. The first
                // sample reads 0 because CPU share needs two readings.
                utilization =
                    (f64::from(process.cpu_usage()) / (100.0 * self.cores)).clamp(0.0, 1.0);
            }
        }
        DeviceSample {
            device: self.device(),
            memory_used_bytes: system.used_memory(),
            memory_total_bytes: system.total_memory(),
            utilization_ratio: utilization,
        }
    }
}

/// How a [`CudaProbe`] reads its GPU.
enum CudaSource {
    /// NVML: device-wide memory and utilization, without a CUDA context.
    Nvml(Arc<nvml_wrapper::Nvml>),
    /// The driver API on the device's primary context (the one candle uses): memory only.
    Driver(Arc<cudarc::driver::CudaContext>),
}

impl std::fmt::Debug for CudaSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            CudaSource::Nvml(_) => "Nvml",
            CudaSource::Driver(_) => "Driver",
        })
    }
}

/// One NVIDIA GPU.
#[derive(Debug)]
pub struct CudaProbe {
    ordinal: u32,
    source: CudaSource,
}

impl CudaProbe {
    /// Opens GPU `ordinal`: NVML when it loads, else the CUDA driver. `None` when neither
    /// is present or the GPU does not exist.
    pub fn try_new(ordinal: u32) -> Option<CudaProbe> {
        if let Ok(nvml) = nvml_wrapper::Nvml::init()
            && nvml.device_by_index(ordinal).is_ok()
        {
            return Some(CudaProbe {
                ordinal,
                source: CudaSource::Nvml(Arc::new(nvml)),
            });
        }
        if !cuda_driver_present() {
            return None;
        }
        let context = cudarc::driver::CudaContext::new(ordinal as usize).ok()?;
        Some(CudaProbe {
            ordinal,
            source: CudaSource::Driver(context),
        })
    }

    /// Whether readings come from NVML (with utilization) rather than the driver.
    pub fn uses_nvml(&self) -> bool {
        matches!(self.source, CudaSource::Nvml(_))
    }
}

/// Whether libcuda can be loaded. cudarc loads it at run time in every build (the `cuda`
/// build too, see README "CUDA"), and panics on first use when it is missing, so we ask
/// first.
#[allow(unsafe_code)]
fn cuda_driver_present() -> bool {
    // SAFETY: `is_culib_present` only tries to dlopen libcuda by its usual names and drops
    // the handle; cudarc marks it unsafe because loading a library runs its initialisers,
    // which for the NVIDIA driver library is the intended use.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

/// The GPU a device spec names: `None` for `cpu`, `Some(0)` for `cuda` or `gpu`,
/// `Some(n)` for `cuda:n`.
///
/// # Errors
/// [`ModelError::InvalidInput`] for any other spec.
pub fn spec_ordinal(device_spec: &str) -> Result<Option<usize>> {
    let spec = device_spec.trim().to_ascii_lowercase();
    match spec.as_str() {
        "cpu" => Ok(None),
        "cuda" | "gpu" => Ok(Some(0)),
        other => other
            .strip_prefix("cuda:")
            .and_then(|n| n.parse::<usize>().ok())
            .map(Some)
            .ok_or_else(|| {
                ModelError::InvalidInput(format!(
                    "unknown device {device_spec:?} (expected cpu, cuda or cuda:N)"
                ))
            }),
    }
}

/// Why this build cannot render on GPU `ordinal` here, in words for the operator; `None`
/// when it can. Checked before candle opens the device, because cudarc panics (rather than
/// returning an error) when a library it loads at run time is missing.
pub fn cuda_unavailable(ordinal: usize) -> Option<String> {
    if !cfg!(feature = "cuda") {
        return Some(
            "this sakuga was built without the `cuda` feature (README, \"CUDA\")".to_owned(),
        );
    }
    if !cuda_driver_present() {
        return Some(
            "the NVIDIA driver library (libcuda.so.1) is not installed or not on the loader path"
                .to_owned(),
        );
    }
    if let Err(e) = cudarc::driver::result::init() {
        return Some(format!("the NVIDIA driver did not start: {e}"));
    }
    match cudarc::driver::result::device::get_count() {
        Ok(count) if (ordinal as i64) < i64::from(count) => {}
        Ok(count) => {
            return Some(format!(
                "there is no GPU {ordinal}: the driver sees {count}"
            ));
        }
        Err(e) => return Some(format!("the NVIDIA driver cannot count GPUs: {e}")),
    }
    let missing = missing_cuda_libraries();
    if !missing.is_empty() {
        return Some(format!(
            "CUDA 13 libraries not found: {} (install the CUDA 13 toolkit, or put its lib64 \
             on LD_LIBRARY_PATH)",
            missing.join(", ")
        ));
    }
    None
}

/// The CUDA libraries candle opens with a device that cannot be loaded. Without the `cuda`
/// feature nothing else is loaded.
#[cfg(feature = "cuda")]
#[allow(unsafe_code)]
fn missing_cuda_libraries() -> Vec<&'static str> {
    // SAFETY: as in `cuda_driver_present`: each call dlopens a CUDA library by its usual
    // names and drops the handle again.
    let found = unsafe {
        [
            ("libcublas.so.13", cudarc::cublas::sys::is_culib_present()),
            (
                "libcublasLt.so.13",
                cudarc::cublaslt::sys::is_culib_present(),
            ),
            ("libcurand.so.10", cudarc::curand::sys::is_culib_present()),
            ("libnvrtc.so.13", cudarc::nvrtc::sys::is_culib_present()),
        ]
    };
    found
        .into_iter()
        .filter_map(|(name, present)| (!present).then_some(name))
        .collect()
}

#[cfg(not(feature = "cuda"))]
fn missing_cuda_libraries() -> Vec<&'static str> {
    Vec::new()
}

/// What a device spec comes to on this machine: the spec itself when it can be used, or
/// `cpu` and the reason when it names a GPU this build or machine cannot use.
///
/// # Errors
/// [`ModelError::InvalidInput`] for a spec that is neither `cpu` nor a CUDA device.
pub fn settle_device(device_spec: &str) -> Result<(String, Option<String>)> {
    let Some(ordinal) = spec_ordinal(device_spec)? else {
        return Ok(("cpu".to_owned(), None));
    };
    Ok(match cuda_unavailable(ordinal) {
        None => (format!("cuda:{ordinal}"), None),
        Some(reason) => ("cpu".to_owned(), Some(reason)),
    })
}

impl DeviceProbe for CudaProbe {
    fn device(&self) -> String {
        format!("cuda:{}", self.ordinal)
    }

    fn sample(&self) -> DeviceSample {
        let mut sample = DeviceSample {
            device: self.device(),
            memory_used_bytes: 0,
            memory_total_bytes: 0,
            utilization_ratio: 0.0,
        };
        match &self.source {
            CudaSource::Nvml(nvml) => {
                if let Ok(device) = nvml.device_by_index(self.ordinal) {
                    if let Ok(memory) = device.memory_info() {
                        sample.memory_used_bytes = memory.used;
                        sample.memory_total_bytes = memory.total;
                    }
                    if let Ok(rates) = device.utilization_rates() {
                        sample.utilization_ratio = f64::from(rates.gpu) / 100.0;
                    }
                }
            }
            CudaSource::Driver(context) => {
                if let Ok((free, total)) = context.mem_get_info() {
                    sample.memory_used_bytes = (total - free) as u64;
                    sample.memory_total_bytes = total as u64;
                }
            }
        }
        sample
    }
}

/// Picks the probe for a device spec: `cpu`, `cuda` (GPU 0) or `cuda:N`. A CUDA spec on a
/// machine without a usable driver falls back to the CPU probe, with a warning.
///
/// # Errors
/// [`ModelError::InvalidInput`] for a spec that is neither.
pub fn probe_for(device_spec: &str) -> Result<Box<dyn DeviceProbe>> {
    let Some(ordinal) = spec_ordinal(device_spec)? else {
        return Ok(Box::new(CpuProbe::new()));
    };
    let ordinal = u32::try_from(ordinal)
        .map_err(|_| ModelError::InvalidInput(format!("bad device spec {device_spec:?}")))?;
    match CudaProbe::try_new(ordinal) {
        Some(probe) => Ok(Box::new(probe)),
        None => {
            tracing::warn!(
                device = device_spec,
                "no usable CUDA driver or GPU; probing the CPU instead"
            );
            Ok(Box::new(CpuProbe::new()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_probe_reads_system_memory() {
        let probe = CpuProbe::new();
        let sample = probe.sample();
        assert_eq!(sample.device, "cpu");
        assert!(sample.memory_total_bytes > 0);
        assert!(sample.memory_used_bytes <= sample.memory_total_bytes);
        assert!((0.0..=1.0).contains(&sample.utilization_ratio));
        assert!(probe.last_process_rss_bytes() > 0);
    }

    #[test]
    fn probe_for_parses_specs() {
        assert_eq!(probe_for("cpu").unwrap().device(), "cpu");
        // With or without a GPU, a CUDA spec yields a working probe.
        let cuda = probe_for("cuda:0").unwrap();
        assert!(cuda.device() == "cuda:0" || cuda.device() == "cpu");
        assert!(probe_for("cuda:x").is_err());
        assert!(probe_for("tpu").is_err());
    }
}
