//! Label values: the closed sets each metric label may take.
//!
//! Prometheus series are cheap only while label values stay few, so every label that is
//! not a node class or a device name is an enum here with an `as_str()` giving the exact
//! spelling the dashboards and alert rules match on. Parsing (`FromStr`) exists for values
//! that arrive from outside: CLI flags, config files, gRPC fields.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::TelemetryError;

/// Declares a label enum with its exact spellings, `ALL`, `as_str`, `Display` and `FromStr`.
macro_rules! label_enum {
    (
        $(#[$meta:meta])*
        $name:ident as $label:literal { $($(#[$vmeta:meta])* $variant:ident => $text:literal),+ $(,)? }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        pub enum $name {
            $($(#[$vmeta])* #[serde(rename = $text)] $variant),+
        }

        impl $name {
            /// Every value, in declaration order (also the index order used by arrays).
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The label value exactly as it appears in metrics and events.
            pub const fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text),+
                }
            }

            /// Position in [`Self::ALL`], for per-value arrays.
            pub const fn index(self) -> usize {
                self as usize
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl FromStr for $name {
            type Err = TelemetryError;

            fn from_str(value: &str) -> Result<Self, Self::Err> {
                match value {
                    $($text => Ok($name::$variant),)+
                    _ => Err(TelemetryError::UnknownLabel { label: $label, value: value.to_owned() }),
                }
            }
        }
    };
}

label_enum! {
    /// The three workload classes; SLOs, queues and dashboards are kept apart per class.
    Workload as "workload" {
        /// Animation previews and streams: judged by FPS health.
        Animation => "animation",
        /// One image (a page, a panel): judged by render latency.
        SingleImage => "single_image",
        /// Many images (comic panel batches): judged by success ratio and queue wait.
        Batch => "batch",
    }
}

label_enum! {
    /// How a job ended (`sakuga_jobs_finished_total{outcome}`).
    Outcome as "outcome" {
        Success => "success",
        Failed => "failed",
        Timeout => "timeout",
        Oom => "oom",
        Cancelled => "cancelled",
    }
}

label_enum! {
    /// What admission control decided for a job.
    Decision as "decision" {
        Admit => "admit",
        Defer => "defer",
        Deny => "deny",
    }
}

label_enum! {
    /// Why admission control decided what it did.
    AdmissionReason as "reason" {
        /// Enough capacity: the job was admitted normally.
        Capacity => "capacity",
        /// The workload's queue is at its cap.
        QueueFull => "queue_full",
        /// The job cannot start before its deadline.
        Deadline => "deadline",
        /// Starting it would push device memory headroom under the floor.
        MemoryHeadroom => "memory_headroom",
        /// Animation FPS health is degraded, so batch starts wait.
        FpsDegraded => "fps_degraded",
        /// Higher-priority work goes first.
        Priority => "priority",
        /// It ran out of device memory and was admitted again once, its batch split.
        OomSplit => "oom_split",
        /// An animation preview admitted degraded in steps so it can keep its target FPS.
        DegradedForFps => "degraded_for_fps",
    }
}

label_enum! {
    /// Pipeline stages (`sakuga_stage_duration_seconds{stage}`, `sakuga_errors_total{stage}`).
    Stage as "stage" {
        Parse => "parse",
        Admit => "admit",
        Queue => "queue",
        Plan => "plan",
        ModelLoad => "model_load",
        Inference => "inference",
        Postprocess => "postprocess",
        Deliver => "deliver",
    }
}

label_enum! {
    /// Frame counters (`sakuga_frames_total{kind}`).
    FrameKind as "kind" {
        Produced => "produced",
        Delivered => "delivered",
        Dropped => "dropped",
        Duplicated => "duplicated",
    }
}

label_enum! {
    /// Which end of a stream a frame interval was measured at.
    FrameSide as "side" {
        Produced => "produced",
        Delivered => "delivered",
    }
}

label_enum! {
    /// Error classes (`sakuga_errors_total{kind}`); every crate's error `kind()` returns one.
    ErrorKind as "kind" {
        Timeout => "timeout",
        Oom => "oom",
        Device => "device",
        InvalidInput => "invalid_input",
        ModelLoad => "model_load",
        Internal => "internal",
    }
}

label_enum! {
    /// Kinds of model files the cache holds and loads.
    ModelKind as "kind" {
        Checkpoint => "checkpoint",
        Vae => "vae",
        Lora => "lora",
        Clip => "clip",
        Upscale => "upscale",
        Interpolation => "interpolation",
        ControlNet => "controlnet",
    }
}

label_enum! {
    /// Model cache lookups (`sakuga_model_cache_requests_total{result}`).
    CacheResult as "result" {
        Hit => "hit",
        Miss => "miss",
    }
}

label_enum! {
    /// What bytes were moved for (`sakuga_io_bytes_total{op}`).
    IoOp as "op" {
        /// Model weights read from the models dir.
        ModelRead => "model_read",
        /// Input assets (LoadImage) read from the input dir.
        InputRead => "input_read",
        /// Outputs written to the output dir.
        OutputWrite => "output_write",
        /// Frames and outputs sent to clients.
        Deliver => "deliver",
    }
}

label_enum! {
    /// Why a job or node was retried (`sakuga_retries_total{reason}`).
    RetryReason as "reason" {
        /// An OOM split the batch and retried it once.
        OomSplit => "oom_split",
        /// A transient device or I/O error.
        Transient => "transient",
        /// A job found unfinished in the journal after a restart.
        Recovery => "recovery",
    }
}

label_enum! {
    /// Automatic frame quality checks (`sakuga_qc_rejections_total{check}`).
    QcCheck as "check" {
        /// The frame holds NaN or infinite values.
        NonFinite => "non_finite",
        /// The frame is one flat colour (all black, all white, ...).
        Blank => "blank",
        /// Values fall outside the `[0, 1]` image range.
        OutOfRange => "out_of_range",
    }
}

label_enum! {
    /// Planned heavy load that silences alerts (`sakuga_planned_heavy_load{reason}`).
    PlannedLoad as "reason" {
        Warmup => "warmup",
        Benchmark => "benchmark",
        Maintenance => "maintenance",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_round_trip_through_their_spelling() {
        for workload in Workload::ALL {
            assert_eq!(workload.as_str().parse::<Workload>().unwrap(), *workload);
        }
        assert_eq!(Workload::SingleImage.as_str(), "single_image");
        assert_eq!(Workload::Batch.index(), 2);
        assert!("video".parse::<Workload>().is_err());
    }

    #[test]
    fn serde_uses_the_metric_spelling() {
        let json = serde_json::to_string(&Workload::SingleImage).unwrap();
        assert_eq!(json, "\"single_image\"");
    }
}
