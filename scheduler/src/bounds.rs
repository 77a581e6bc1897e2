//! Caps on the parts of a request other than the workflow (whose caps are
//! [`crate::admission::WorkflowLimits`]): labels, idempotency keys, job ids, page tokens
//! and deadlines. Everything a client sends is kept in memory and in the journal for as
//! long as the job is, so every string and map is bounded here, before anything is stored.

use std::time::SystemTime;

use crate::engine::SubmitRequest;
use crate::error::SchedulerError;

/// Labels on one job (and pairs in one `ListJobs` filter).
pub const MAX_LABELS: usize = 32;
/// Bytes of one label key.
pub const MAX_LABEL_KEY_BYTES: usize = 128;
/// Bytes of one label value.
pub const MAX_LABEL_VALUE_BYTES: usize = 512;
/// Bytes of an idempotency key.
pub const MAX_IDEMPOTENCY_KEY_BYTES: usize = 256;
/// Bytes of a job id in a request (issued ids are 36).
pub const MAX_JOB_ID_BYTES: usize = 128;
/// Bytes of a `ListJobs` page token (issued tokens are at most 20).
pub const MAX_PAGE_TOKEN_BYTES: usize = 32;

fn invalid(field: &'static str, reason: String) -> SchedulerError {
    SchedulerError::InvalidArgument { field, reason }
}

fn check_len(
    field: &'static str,
    what: &str,
    text: &str,
    limit: usize,
) -> Result<(), SchedulerError> {
    if text.len() > limit {
        return Err(invalid(
            field,
            format!("{what} is {} bytes, the limit is {limit}", text.len()),
        ));
    }
    Ok(())
}

/// Checks a label map (`field` names it in the error: `labels`).
///
/// # Errors
/// [`SchedulerError::InvalidArgument`] naming the field and the limit passed.
pub fn check_labels<'a>(
    field: &'static str,
    labels: impl ExactSizeIterator<Item = (&'a String, &'a String)>,
) -> Result<(), SchedulerError> {
    if labels.len() > MAX_LABELS {
        return Err(invalid(
            field,
            format!("{} labels, the limit is {MAX_LABELS}", labels.len()),
        ));
    }
    for (key, value) in labels {
        check_len(field, "a key", key, MAX_LABEL_KEY_BYTES)?;
        if key.is_empty() {
            return Err(invalid(field, "a key is empty".into()));
        }
        check_len(field, "a value", value, MAX_LABEL_VALUE_BYTES)?;
    }
    Ok(())
}

/// Checks a job id given in a request.
///
/// # Errors
/// [`SchedulerError::InvalidArgument`] when it is longer than any issued id.
pub fn check_job_id(job_id: &str) -> Result<(), SchedulerError> {
    check_len("job_id", "the id", job_id, MAX_JOB_ID_BYTES)
}

/// Checks everything of a submission but the workflow; `now` judges the deadline.
///
/// # Errors
/// [`SchedulerError::InvalidArgument`] naming the field: labels or idempotency key over
/// their caps, or a deadline that has already passed (the job could never start).
pub fn check_submit(request: &SubmitRequest, now: SystemTime) -> Result<(), SchedulerError> {
    check_labels("labels", request.labels.iter())?;
    if let Some(key) = &request.idempotency_key {
        check_len("idempotency_key", "the key", key, MAX_IDEMPOTENCY_KEY_BYTES)?;
    }
    if let Some(deadline) = request.deadline
        && deadline <= now
    {
        let ago = now.duration_since(deadline).unwrap_or_default();
        return Err(invalid(
            "deadline_unix_ms",
            format!(
                "the deadline passed {:.3}s ago; the job could never start",
                ago.as_secs_f64()
            ),
        ));
    }
    Ok(())
}

/// Parses a `ListJobs` page token (the sequence number to continue below).
///
/// # Errors
/// [`SchedulerError::InvalidArgument`] for anything `ListJobs` did not issue.
pub fn parse_page_token(token: &str) -> Result<u64, SchedulerError> {
    check_len("page_token", "the token", token, MAX_PAGE_TOKEN_BYTES)?;
    token
        .parse()
        .map_err(|_| invalid("page_token", "not a token ListJobs returned".into()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::time::Duration;

    fn field_of(result: Result<(), SchedulerError>) -> &'static str {
        match result {
            Err(SchedulerError::InvalidArgument { field, .. }) => field,
            other => panic!("expected InvalidArgument, got {other:?}"),
        }
    }

    #[test]
    fn labels_keys_and_deadlines_are_bounded() {
        let now = SystemTime::now();
        let mut request = SubmitRequest::default();
        assert!(check_submit(&request, now).is_ok());
        request.labels = (0..=MAX_LABELS)
            .map(|i| (i.to_string(), String::new()))
            .collect();
        assert_eq!(field_of(check_submit(&request, now)), "labels");
        request.labels = BTreeMap::from([("k".into(), "v".repeat(MAX_LABEL_VALUE_BYTES + 1))]);
        assert_eq!(field_of(check_submit(&request, now)), "labels");
        request.labels = BTreeMap::from([("k".repeat(MAX_LABEL_KEY_BYTES + 1), "v".into())]);
        assert_eq!(field_of(check_submit(&request, now)), "labels");
        request.labels.clear();
        request.idempotency_key = Some("k".repeat(MAX_IDEMPOTENCY_KEY_BYTES + 1));
        assert_eq!(field_of(check_submit(&request, now)), "idempotency_key");
        request.idempotency_key = Some("k".repeat(MAX_IDEMPOTENCY_KEY_BYTES));
        request.deadline = Some(now - Duration::from_secs(1));
        assert_eq!(field_of(check_submit(&request, now)), "deadline_unix_ms");
        request.deadline = Some(now + Duration::from_secs(1));
        assert!(check_submit(&request, now).is_ok());
    }

    #[test]
    fn page_tokens_must_be_issued_ones() {
        assert_eq!(parse_page_token("42").unwrap(), 42);
        for garbage in ["", "abc", "-1", "1.5", &"9".repeat(40)] {
            assert!(parse_page_token(garbage).is_err(), "{garbage:?}");
        }
    }
}
