//! The jobs a front end (the ComfyUI API) works with: the local engine's, or on a cluster
//! gateway every job of the cluster. Same calls and types either way, so the front end
//! does not know which.

use std::path::PathBuf;

use sakuga_scheduler::EngineHandle;
use sakuga_scheduler::engine::{
    JobInfo, JobPage, JobWatch, ListFilter, SubmitRequest, Submitted, WatchItem,
};

use crate::cluster::events::{ClusterWatch, to_watch_item};
use crate::cluster::{ClusterError, Gateway};

/// Where jobs go.
#[derive(Debug, Clone)]
pub enum Jobs {
    Local(EngineHandle),
    /// A cluster gateway; outputs are shown under `<out_dir>/<job_id>/`, so the job id is
    /// the first folder of their ComfyUI `subfolder` and `/view` finds them in the object
    /// store.
    Cluster(Box<Gateway>, PathBuf),
}

/// A cluster job's outputs under `<out_dir>/<job_id>/`.
fn placed(mut info: JobInfo, out_dir: &std::path::Path) -> JobInfo {
    for output in &mut info.outputs {
        output.path = out_dir.join(&info.job_id).join(&output.path);
    }
    info
}

/// A job's feed, from the local engine or the cluster's events stream.
#[derive(Debug)]
pub enum JobStream {
    Local(JobWatch),
    Cluster {
        watch: Box<ClusterWatch>,
        job_id: String,
        out_dir: PathBuf,
        seq: u64,
    },
}

impl JobStream {
    /// The next item; `None` after the job's end.
    pub async fn next(&mut self) -> Option<WatchItem> {
        match self {
            JobStream::Local(watch) => watch.next().await,
            JobStream::Cluster {
                watch,
                job_id,
                out_dir,
                seq,
            } => loop {
                let event = watch.next().await?.ok()?;
                *seq += 1;
                if let Some(item) = to_watch_item(event, *seq, job_id, out_dir) {
                    return Some(item);
                }
            },
        }
    }
}

impl Jobs {
    /// # Errors
    /// As [`EngineHandle::submit`], or NATS unreachable.
    pub async fn submit(&self, request: SubmitRequest) -> Result<Submitted, ClusterError> {
        match self {
            Jobs::Local(engine) => Ok(engine.submit(request).await?),
            Jobs::Cluster(gateway, _) => gateway.submit(request).await,
        }
    }

    /// # Errors
    /// Unknown job, or NATS unreachable.
    pub async fn get(&self, job_id: &str) -> Result<JobInfo, ClusterError> {
        match self {
            Jobs::Local(engine) => Ok(engine.get(job_id).await?),
            Jobs::Cluster(gateway, out) => Ok(placed(gateway.get(job_id).await?, out)),
        }
    }

    /// # Errors
    /// Unknown job, or NATS unreachable.
    pub async fn cancel(&self, job_id: &str) -> Result<JobInfo, ClusterError> {
        match self {
            Jobs::Local(engine) => Ok(engine.cancel(job_id).await?),
            Jobs::Cluster(gateway, out) => Ok(placed(gateway.cancel(job_id).await?, out)),
        }
    }

    /// # Errors
    /// A bad page token, or NATS unreachable.
    pub async fn list(
        &self,
        filter: ListFilter,
        page_size: usize,
        token: Option<String>,
    ) -> Result<JobPage, ClusterError> {
        match self {
            Jobs::Local(engine) => Ok(engine.list(filter, page_size, token).await?),
            Jobs::Cluster(gateway, out) => {
                let mut page = gateway.list(filter, page_size, token).await?;
                page.jobs = page.jobs.into_iter().map(|j| placed(j, out)).collect();
                Ok(page)
            }
        }
    }

    /// # Errors
    /// Unknown job, or NATS unreachable.
    pub async fn watch(&self, job_id: &str) -> Result<JobStream, ClusterError> {
        match self {
            Jobs::Local(engine) => Ok(JobStream::Local(engine.watch(job_id).await?)),
            Jobs::Cluster(gateway, out_dir) => Ok(JobStream::Cluster {
                watch: Box::new(gateway.watch(job_id).await?),
                job_id: job_id.to_owned(),
                out_dir: out_dir.clone(),
                seq: 0,
            }),
        }
    }

    /// Jobs queued or running.
    pub fn active(&self) -> usize {
        match self {
            Jobs::Local(engine) => engine.active_jobs(),
            Jobs::Cluster(gateway, _) => {
                let demand = gateway.demand();
                demand.queued_jobs + demand.running_jobs
            }
        }
    }
}
