//! The one place engine errors become gRPC statuses: invalid workflows carry their
//! ComfyUI `node_errors` in the status details (a `BadRequest` violation per problem and
//! their JSON in `ErrorInfo` metadata), bounded so the details fit in HTTP/2 trailers;
//! denials carry `RetryInfo`.

use std::collections::HashMap;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use sakuga_scheduler::validate::clip;
use sakuga_scheduler::{NodeErrors, SchedulerError, ValidationReport};

/// `ErrorInfo.domain` of sakuga's errors.
pub const ERROR_DOMAIN: &str = "sakuga.render";

/// Problems listed one by one in an INVALID_ARGUMENT status; the rest are counted.
pub const MAX_STATUS_PROBLEMS: usize = 10;
/// Encoded size the status details may reach. They travel base64 in the trailers, and
/// HTTP/2 peers commonly refuse header blocks past 8-16 KiB ("h2 protocol error").
pub const MAX_STATUS_DETAILS_BYTES: usize = 4096;
/// Longest status message; the text is client-influenced (ids, names).
const MAX_MESSAGE_BYTES: usize = 1024;
/// Longest field or description of one violation.
const MAX_VIOLATION_BYTES: usize = 300;

/// Maps a cluster-mode error to its status: NATS unreachable is UNAVAILABLE (clients
/// retry), engine errors as [`status_of`].
pub fn status_of_cluster(error: crate::cluster::ClusterError) -> Status {
    use crate::cluster::ClusterError;
    match error {
        ClusterError::Scheduler(e) => status_of(e),
        e @ (ClusterError::Unavailable { .. } | ClusterError::Connect { .. }) => {
            Status::unavailable(clip(&e.to_string(), MAX_MESSAGE_BYTES).into_owned())
        }
        e @ ClusterError::NoOutput { .. } => Status::not_found(e.to_string()),
        e @ (ClusterError::Record { .. } | ClusterError::Io { .. }) => {
            Status::internal(clip(&e.to_string(), MAX_MESSAGE_BYTES).into_owned())
        }
    }
}

/// Maps an engine error to its status.
pub fn status_of(error: SchedulerError) -> Status {
    let message = clip(&error.to_string(), MAX_MESSAGE_BYTES).into_owned();
    match error {
        SchedulerError::Invalid(report) => invalid_status(&report, message),
        SchedulerError::Malformed { .. }
        | SchedulerError::TooLarge { .. }
        | SchedulerError::UiNode { .. }
        | SchedulerError::UiFormat { .. }
        | SchedulerError::NoEmbeddedWorkflow { .. } => {
            let mut details = ErrorDetails::new();
            details.add_bad_request_violation("workflow", message.clone());
            Status::with_error_details(Code::InvalidArgument, message, details)
        }
        SchedulerError::InvalidArgument { field, .. } => {
            let mut details = ErrorDetails::new();
            details.add_bad_request_violation(field, message.clone());
            Status::with_error_details(Code::InvalidArgument, message, details)
        }
        SchedulerError::Denied {
            reason,
            retry_after,
            ..
        } => {
            let mut details = ErrorDetails::new();
            details.set_retry_info(Some(retry_after));
            details.set_error_info(reason.as_str(), ERROR_DOMAIN, HashMap::new());
            Status::with_error_details(Code::ResourceExhausted, message, details)
        }
        SchedulerError::JobNotFound { .. } => Status::not_found(message),
        SchedulerError::ShuttingDown => Status::unavailable(message),
        SchedulerError::DeadlineExceeded { .. } => Status::deadline_exceeded(message),
        _ => Status::internal(message),
    }
}

/// INVALID_ARGUMENT for a report: the first problems as `BadRequest` violations and their
/// `node_errors` JSON in `ErrorInfo` metadata, shrunk until the details fit the trailer
/// budget. Metadata `problems` and `omitted` count what was left out; `ValidateWorkflow`
/// returns the whole report in its response body.
fn invalid_status(report: &ValidationReport, message: String) -> Status {
    let total: usize = report.node_errors.values().map(|n| n.errors.len()).sum();
    let mut shown = MAX_STATUS_PROBLEMS;
    loop {
        let details = invalid_details(report, total, shown);
        let status = Status::with_error_details(Code::InvalidArgument, message.clone(), details);
        if status.details().len() <= MAX_STATUS_DETAILS_BYTES || shown == 0 {
            return status;
        }
        shown /= 2;
    }
}

fn invalid_details(report: &ValidationReport, total: usize, shown: usize) -> ErrorDetails {
    let mut details = ErrorDetails::new();
    let mut bounded = ValidationReport {
        error: report.error.clone(),
        node_errors: Default::default(),
    };
    let mut listed = 0;
    for (node_id, node) in &report.node_errors {
        if listed == shown {
            break;
        }
        let field = format!(
            "node {} ({})",
            clip(node_id, 64),
            clip(&node.class_type, 64)
        );
        let mut kept = NodeErrors {
            errors: Vec::new(),
            dependent_outputs: node.dependent_outputs.iter().take(4).cloned().collect(),
            class_type: clip(&node.class_type, 64).into_owned(),
        };
        for e in node.errors.iter().take(shown - listed) {
            let description = format!("{}: {} {}", e.kind, e.message, e.details);
            details.add_bad_request_violation(
                clip(&field, MAX_VIOLATION_BYTES),
                clip(description.trim_end(), MAX_VIOLATION_BYTES),
            );
            kept.errors.push(e.clone());
            listed += 1;
        }
        bounded
            .node_errors
            .insert(clip(node_id, 64).into_owned(), kept);
    }
    if report.node_errors.is_empty() {
        details.add_bad_request_violation(
            "workflow",
            clip(
                &format!("{}: {}", report.error.kind, report.error.message),
                MAX_VIOLATION_BYTES,
            ),
        );
    }
    let omitted = total - listed;
    if omitted > 0 {
        details.add_bad_request_violation(
            "workflow",
            format!(
                "{omitted} more problem(s) not listed here; ValidateWorkflow returns the full report"
            ),
        );
    }
    let metadata = HashMap::from([
        ("node_errors".to_owned(), bounded.to_json().to_string()),
        ("problems".to_owned(), total.to_string()),
        ("omitted".to_owned(), omitted.to_string()),
    ]);
    details.set_error_info(report.error.kind, ERROR_DOMAIN, metadata);
    details
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::time::Duration;

    use sakuga_scheduler::ValidationError;
    use sakuga_telemetry::{AdmissionReason, Workload};
    use serde_json::json;

    use super::*;

    fn problem(message: &str) -> ValidationError {
        ValidationError {
            kind: "value_bigger_than_max",
            message: message.into(),
            details: "width".into(),
            extra_info: json!({}),
        }
    }

    /// A report with `nodes` nodes of `per_node` problems each, messages `size` bytes long.
    fn report(nodes: usize, per_node: usize, size: usize) -> ValidationReport {
        let node_errors: BTreeMap<String, NodeErrors> = (0..nodes)
            .map(|n| {
                let errors = (0..per_node).map(|_| problem(&"x".repeat(size))).collect();
                let node = NodeErrors {
                    errors,
                    dependent_outputs: vec!["9".into()],
                    class_type: "EmptyImage".into(),
                };
                (n.to_string(), node)
            })
            .collect();
        ValidationReport {
            error: ValidationError {
                kind: "prompt_outputs_failed_validation",
                message: "Prompt outputs failed validation".into(),
                details: String::new(),
                extra_info: json!({}),
            },
            node_errors,
        }
    }

    #[test]
    fn an_invalid_workflow_lists_its_problems_within_the_trailer_budget() {
        let status = status_of(SchedulerError::Invalid(Box::new(report(3, 2, 20))));
        assert_eq!(status.code(), Code::InvalidArgument);
        let details = status.get_error_details();
        assert_eq!(details.bad_request().unwrap().field_violations.len(), 6);
        let info = details.error_info().unwrap();
        assert_eq!(info.domain, ERROR_DOMAIN);
        assert_eq!(info.metadata["problems"], "6");
        assert_eq!(info.metadata["omitted"], "0");
        let node_errors: serde_json::Value =
            serde_json::from_str(&info.metadata["node_errors"]).unwrap();
        assert_eq!(node_errors["node_errors"]["0"]["class_type"], "EmptyImage");

        let huge = status_of(SchedulerError::Invalid(Box::new(report(50, 10, 250))));
        assert!(huge.details().len() <= MAX_STATUS_DETAILS_BYTES);
        assert!(huge.message().len() <= MAX_MESSAGE_BYTES);
        let info = huge.get_error_details().error_info().unwrap().clone();
        assert_eq!(info.metadata["problems"], "500");
        assert!(info.metadata["omitted"].parse::<usize>().unwrap() >= 490);
    }

    #[test]
    fn each_error_class_has_its_code_and_denials_carry_a_retry_hint() {
        let denied = status_of(SchedulerError::Denied {
            workload: Workload::Batch,
            reason: AdmissionReason::QueueFull,
            detail: "12 queued".into(),
            retry_after: Duration::from_secs(7),
        });
        assert_eq!(denied.code(), Code::ResourceExhausted);
        let details = denied.get_error_details();
        assert_eq!(
            details.retry_info().unwrap().retry_delay,
            Some(Duration::from_secs(7))
        );
        assert_eq!(details.error_info().unwrap().reason, "queue_full");
        let cases = [
            (
                SchedulerError::JobNotFound { job_id: "x".into() },
                Code::NotFound,
            ),
            (SchedulerError::ShuttingDown, Code::Unavailable),
            (
                SchedulerError::DeadlineExceeded { job_id: "x".into() },
                Code::DeadlineExceeded,
            ),
            (
                SchedulerError::Malformed {
                    reason: "not JSON".into(),
                },
                Code::InvalidArgument,
            ),
            (
                SchedulerError::InvalidArgument {
                    field: "labels",
                    reason: "too many".into(),
                },
                Code::InvalidArgument,
            ),
            (
                SchedulerError::NodePanicked {
                    node_id: "1".into(),
                    class_type: "X".into(),
                    message: "boom".into(),
                },
                Code::Internal,
            ),
        ];
        for (error, code) in cases {
            let text = error.to_string();
            let status = status_of(error);
            assert_eq!(status.code(), code, "{text}");
            assert_eq!(status.message(), text);
        }
        let labelled = status_of(SchedulerError::InvalidArgument {
            field: "labels",
            reason: "too many".into(),
        });
        let violations = labelled
            .get_error_details()
            .bad_request()
            .unwrap()
            .field_violations
            .clone();
        assert_eq!(violations[0].field, "labels");
    }
}
