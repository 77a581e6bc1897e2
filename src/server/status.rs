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
