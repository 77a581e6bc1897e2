//! The one place engine errors become gRPC statuses: invalid workflows carry their
//! ComfyUI `node_errors` in the status details (a `BadRequest` violation per problem and
//! the full JSON in `ErrorInfo` metadata), denials carry `RetryInfo`.

use std::collections::HashMap;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use sakuga_scheduler::SchedulerError;

/// `ErrorInfo.domain` of sakuga's errors.
pub const ERROR_DOMAIN: &str = "sakuga.render";

/// Maps an engine error to its status.
pub fn status_of(error: SchedulerError) -> Status {
    let message = error.to_string();
    match error {
        SchedulerError::Invalid(report) => {
            let mut details = ErrorDetails::new();
            for (node_id, node) in &report.node_errors {
                for e in &node.errors {
                    details.add_bad_request_violation(
                        format!("node {node_id} ({})", node.class_type),
                        format!("{}: {} {}", e.kind, e.message, e.details)
                            .trim_end()
                            .to_owned(),
                    );
                }
            }
            if report.node_errors.is_empty() {
                details.add_bad_request_violation(
                    "workflow",
                    format!("{}: {}", report.error.kind, report.error.message),
                );
            }
            let metadata =
                HashMap::from([("node_errors".to_owned(), report.to_json().to_string())]);
            details.set_error_info(report.error.kind, ERROR_DOMAIN, metadata);
            Status::with_error_details(Code::InvalidArgument, message, details)
        }
        SchedulerError::Malformed { .. } | SchedulerError::TooLarge { .. } => {
            let mut details = ErrorDetails::new();
            details.add_bad_request_violation("workflow", message.clone());
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
        other => Status::internal(other.to_string()),
    }
}
