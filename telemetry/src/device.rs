//! Device signals: the [`DeviceProbe`] trait and the sampler thread that polls it.
//!
//! Probes (CPU via sysinfo, CUDA via the driver and NVML) live in `sakuga-models`, next to
//! the code that owns devices; telemetry only defines what a sample is, polls on a thread
//! of its own (probing NVML can take milliseconds and must never run on tokio), publishes
//! the `sakuga_device_*` gauges and keeps the latest sample for admission control.

use std::sync::Arc;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::thread::JoinHandle;
use std::time::Duration;

use parking_lot::{Condvar, Mutex};
use serde::{Deserialize, Serialize};

use crate::error::{Result, TelemetryError};
use crate::record;

/// One reading of a device's memory and load.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeviceSample {
    /// `cpu`, `cuda:0`, ...
    pub device: String,
    pub memory_used_bytes: u64,
    pub memory_total_bytes: u64,
    /// Compute utilization, 0 to 1.
    pub utilization_ratio: f64,
}

impl DeviceSample {
    /// Free memory over capacity (0 when capacity is unknown).
    pub fn headroom_ratio(&self) -> f64 {
        record::headroom_ratio(self.memory_used_bytes, self.memory_total_bytes)
    }

    /// Free memory in bytes.
    pub fn free_bytes(&self) -> u64 {
        self.memory_total_bytes
            .saturating_sub(self.memory_used_bytes)
    }
}

/// Something that can read a device's memory and utilization.
pub trait DeviceProbe: Send + Sync + 'static {
    /// The device label (`cpu`, `cuda:0`).
    fn device(&self) -> String;
    /// Reads the device now. Should not block for long; runs on the sampler thread.
    fn sample(&self) -> DeviceSample;
}

impl<P: DeviceProbe + ?Sized> DeviceProbe for Box<P> {
    fn device(&self) -> String {
        (**self).device()
    }
    fn sample(&self) -> DeviceSample {
        (**self).sample()
    }
}

impl<P: DeviceProbe + ?Sized> DeviceProbe for Arc<P> {
    fn device(&self) -> String {
        (**self).device()
    }
    fn sample(&self) -> DeviceSample {
        (**self).sample()
    }
}

/// The latest sample, shared between the sampler thread and readers.
#[derive(Debug, Default)]
struct Latest {
    sample: Mutex<Option<DeviceSample>>,
    taken: Condvar,
}

/// Handle to a running sampler thread; dropping it stops and joins the thread.
#[derive(Debug)]
pub struct DeviceSampler {
    latest: Arc<Latest>,
    /// Dropping the sender wakes the thread and tells it to stop.
    stop: Option<mpsc::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl DeviceSampler {
    /// The most recent sample, if one was taken.
    pub fn latest(&self) -> Option<DeviceSample> {
        self.latest.sample.lock().clone()
    }

    /// Waits up to `timeout` for the first sample (the thread takes one as it starts).
    pub fn wait_first(&self, timeout: Duration) -> Option<DeviceSample> {
        let mut sample = self.latest.sample.lock();
        if sample.is_none() {
            self.latest.taken.wait_for(&mut sample, timeout);
        }
        sample.clone()
    }
}

impl Drop for DeviceSampler {
    fn drop(&mut self) {
        self.stop.take();
        if let Some(thread) = self.thread.take() {
            // A panicking probe already ended the thread; nothing more to do.
            let _ = thread.join();
        }
    }
}

/// Polls `probe` every `interval` on a named thread, publishing the device gauges.
///
/// # Errors
/// [`TelemetryError::SamplerThread`] when the thread cannot be spawned.
pub fn spawn_device_sampler(probe: impl DeviceProbe, interval: Duration) -> Result<DeviceSampler> {
    spawn_device_sampler_with(probe, interval, |_| {})
}

/// Like [`spawn_device_sampler`], also handing every sample to `on_sample` (how
/// [`crate::Signals`] feeds its windows and SLOs).
///
/// # Errors
/// [`TelemetryError::SamplerThread`] when the thread cannot be spawned.
pub fn spawn_device_sampler_with(
    probe: impl DeviceProbe,
    interval: Duration,
    on_sample: impl Fn(&DeviceSample) + Send + 'static,
) -> Result<DeviceSampler> {
    let latest = Arc::new(Latest::default());
    let (stop, stopped) = mpsc::channel::<()>();
    let device = probe.device();
    let shared = Arc::clone(&latest);
    let thread = std::thread::Builder::new()
        .name(format!("sakuga-probe-{device}"))
        .spawn(move || device_sampler_worker(probe, interval, stopped, shared, on_sample))
        .map_err(|source| TelemetryError::SamplerThread { device, source })?;
    Ok(DeviceSampler {
        latest,
        stop: Some(stop),
        thread: Some(thread),
    })
}

fn device_sampler_worker(
    probe: impl DeviceProbe,
    interval: Duration,
    stopped: mpsc::Receiver<()>,
    latest: Arc<Latest>,
    on_sample: impl Fn(&DeviceSample),
) {
    loop {
        let sample = probe.sample();
        record::device_sample(
            &sample.device,
            sample.memory_used_bytes,
            sample.memory_total_bytes,
            sample.utilization_ratio,
        );
        on_sample(&sample);
        *latest.sample.lock() = Some(sample);
        latest.taken.notify_all();
        // The interval doubles as the stop signal: a dropped handle disconnects at once.
        match stopped.recv_timeout(interval) {
            Err(RecvTimeoutError::Timeout) => continue,
            Ok(()) | Err(RecvTimeoutError::Disconnected) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};

    #[derive(Debug, Default)]
    struct FakeProbe {
        samples: AtomicU64,
    }

    impl DeviceProbe for Arc<FakeProbe> {
        fn device(&self) -> String {
            "fake:0".into()
        }
        fn sample(&self) -> DeviceSample {
            let n = self.samples.fetch_add(1, Ordering::SeqCst);
            DeviceSample {
                device: "fake:0".into(),
                memory_used_bytes: 600 + n,
                memory_total_bytes: 1000,
                utilization_ratio: 0.75,
            }
        }
    }

    #[test]
    fn sampler_publishes_latest_and_stops_on_drop() {
        let probe = Arc::new(FakeProbe::default());
        let (seen_tx, seen_rx) = mpsc::channel();
        let sampler = spawn_device_sampler_with(
            Arc::clone(&probe),
            Duration::from_secs(3600),
            move |s: &DeviceSample| {
                let _ = seen_tx.send(s.memory_used_bytes);
            },
        )
        .unwrap();
        let first = sampler.wait_first(Duration::from_secs(10)).unwrap();
        assert_eq!(first.device, "fake:0");
        assert!((first.headroom_ratio() - 0.4).abs() < 1e-9);
        assert_eq!(seen_rx.recv_timeout(Duration::from_secs(10)).unwrap(), 600);
        drop(sampler);
        // The thread is joined: with an hour-long interval it took exactly one sample.
        assert_eq!(probe.samples.load(Ordering::SeqCst), 1);
    }
}
