//! `/ws?clientId=`: ComfyUI's WebSocket. A client gets `status` on connect and on queue
//! changes, and the messages of the jobs it submitted with that `client_id` (as ComfyUI
//! sends them only to the submitting client). A relay task per job follows the job's feed
//! and sends to whichever connection holds the client id at that moment, so a client that
//! reconnects with its id picks up where the job is; one that never comes back costs
//! nothing but the dropped messages.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Query, State};
use axum::response::Response;
use axum::routing::get;
use parking_lot::Mutex;
use serde_json::{Value as Json, json};
use tokio::sync::mpsc;

use sakuga_scheduler::engine::WatchItem;

use super::AppState;
use super::events::{Translator, message, preview_frame};

/// Messages queued per client; past it preview frames are dropped and events wait.
const CLIENT_QUEUE: usize = 256;
/// How long an event waits for room in a slow client's queue before it is dropped.
const EVENT_SEND_WAIT: Duration = Duration::from_secs(10);
/// Largest message a client may send (clients send nothing ComfyUI acts on).
const MAX_INCOMING_BYTES: usize = 64 << 10;
/// Longest client id kept; longer ones get a server-made id.
const MAX_CLIENT_ID: usize = 128;
/// Most queued messages written with one flush.
const SEND_BATCH: usize = 64;
/// The WebSocket's read buffer. tungstenite zero-fills the free part of it on every read
/// attempt, and a connection tries a read each time it sends; clients send next to
/// nothing, so its 128 KiB default cost a 128 KiB memset per message sent.
const READ_BUFFER: usize = 4 << 10;

/// Connected clients by client id.
#[derive(Debug, Default)]
pub struct Hub {
    clients: Mutex<HashMap<String, (u64, mpsc::Sender<Message>)>>,
    next_conn: AtomicU64,
}

impl Hub {
    fn register(&self, client_id: &str, tx: mpsc::Sender<Message>) -> u64 {
        let conn = self.next_conn.fetch_add(1, Ordering::Relaxed);
        // A reconnect with the same id replaces the old connection, as in ComfyUI.
        self.clients.lock().insert(client_id.to_owned(), (conn, tx));
        conn
    }

    fn unregister(&self, client_id: &str, conn: u64) {
        let mut clients = self.clients.lock();
        if clients.get(client_id).is_some_and(|(c, _)| *c == conn) {
            clients.remove(client_id);
        }
    }

    fn sender(&self, client_id: &str) -> Option<mpsc::Sender<Message>> {
        self.clients.lock().get(client_id).map(|(_, tx)| tx.clone())
    }

    /// Whether a connection holds `client_id` now.
    pub fn is_connected(&self, client_id: &str) -> bool {
        self.clients.lock().contains_key(client_id)
    }

    /// Sends a JSON message to `client_id`, waiting a bounded time for room.
    pub async fn send_json(&self, client_id: &str, value: &Json) {
        if let Some(tx) = self.sender(client_id) {
            let msg = Message::Text(value.to_string().into());
            let _ = tokio::time::timeout(EVENT_SEND_WAIT, tx.send(msg)).await;
        }
    }

    /// Sends a binary message to `client_id` if there is room now.
    pub fn try_send_binary(&self, client_id: &str, bytes: Vec<u8>) {
        if let Some(tx) = self.sender(client_id) {
            let _ = tx.try_send(Message::Binary(bytes.into()));
        }
    }

    /// Sends a JSON message to every client that has room for it.
    pub fn broadcast(&self, value: &Json) {
        let text: axum::extract::ws::Utf8Bytes = value.to_string().into();
        let senders: Vec<_> = self
            .clients
            .lock()
            .values()
            .map(|(_, tx)| tx.clone())
            .collect();
        for tx in senders {
            let _ = tx.try_send(Message::Text(text.clone()));
        }
    }
}

pub(super) fn routes() -> Router<Arc<AppState>> {
    Router::new().route("/ws", get(ws_handler))
}

/// `{"status": {"exec_info": {"queue_remaining": n}}}`: queued plus running jobs.
pub fn queue_status(app: &AppState) -> Json {
    let remaining = app.jobs().map_or(0, |jobs| jobs.active());
    json!({"exec_info": {"queue_remaining": remaining}})
}

/// Tells every client the queue changed, soon: [`status_task`] sends it.
pub fn broadcast_status(app: &AppState) {
    app.status_due.notify_one();
}

/// Sends the queue `status` to every client each time [`broadcast_status`] asked for it.
/// Requests made while one is being answered fold into the next answer, so a burst of
/// submissions and completions costs one message per client instead of one per change
/// (with 8 busy clients that was 16 messages per job); the last status sent always reads
/// the queue after the latest change.
pub async fn status_task(app: Arc<AppState>) {
    let mut closing = app.closing.clone();
    loop {
        tokio::select! {
            () = app.status_due.notified() => {}
            _ = closed(&mut closing) => return,
        }
        let status = queue_status(&app);
        app.hub
            .broadcast(&message("status", json!({ "status": status })));
    }
}

/// Resolves once the server is stopping.
async fn closed(closing: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = closing.wait_for(|c| *c).await;
}

fn client_id_from(query: &HashMap<String, String>) -> String {
    query
        .get("clientId")
        .filter(|id| !id.is_empty() && id.len() <= MAX_CLIENT_ID)
        .cloned()
        .unwrap_or_else(|| format!("{:032x}", rand_id()))
}

/// A fresh id for a client that brought none (uniqueness only, not secrecy).
fn rand_id() -> u128 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    (u128::from(h.finish()) << 64) | u128::from(h.finish().rotate_left(17))
}

async fn ws_handler(
    State(app): State<Arc<AppState>>,
    Query(query): Query<HashMap<String, String>>,
    upgrade: WebSocketUpgrade,
) -> Response {
    let client_id = client_id_from(&query);
    upgrade
        .max_message_size(MAX_INCOMING_BYTES)
        .max_frame_size(MAX_INCOMING_BYTES)
        .read_buffer_size(READ_BUFFER)
        .on_upgrade(move |socket| client_task(app, client_id, socket))
}

/// One connection: the initial `status` with the client's `sid`, then whatever the hub
/// queues for it, until either side closes or the server stops.
async fn client_task(app: Arc<AppState>, client_id: String, mut socket: WebSocket) {
    let (tx, mut rx) = mpsc::channel(CLIENT_QUEUE);
    let conn = app.hub.register(&client_id, tx);
    let status = queue_status(&app);
    let hello = message("status", json!({"status": status, "sid": client_id}));
    let mut closing = app.closing.clone();
    if socket
        .send(Message::Text(hello.to_string().into()))
        .await
        .is_ok()
    {
        loop {
            tokio::select! {
                queued = rx.recv() => {
                    let Some(msg) = queued else { break };
                    if send_batch(&mut socket, msg, &mut rx).await.is_err() {
                        break;
                    }
                }
                incoming = socket.recv() => match incoming {
                    Some(Ok(Message::Close(_))) | Some(Err(_)) | None => break,
                    Some(Ok(_)) => {}
                },
                _ = closed(&mut closing) => break,
            }
        }
    }
    app.hub.unregister(&client_id, conn);
}

/// Sends `first` and whatever else is queued already (up to [`SEND_BATCH`]) with one
/// flush: a job's messages come in bursts (`executing`, `executed`, `execution_success`,
/// a `status`), and a write and a wake-up of the client per message cost more than the
/// messages.
async fn send_batch(
    socket: &mut WebSocket,
    first: Message,
    rx: &mut mpsc::Receiver<Message>,
) -> Result<(), axum::Error> {
    use futures_util::SinkExt;
    socket.feed(first).await?;
    for _ in 1..SEND_BATCH {
        match rx.try_recv() {
            Ok(msg) => socket.feed(msg).await?,
            Err(_) => break,
        }
    }
    socket.flush().await
}

/// Follows job `job_id` to its end, sending its messages to `client_id` (when given and
/// connected) and a queue `status` to everyone when it ends; records the `execution_*`
/// messages for `/history`.
pub async fn relay_task(app: Arc<AppState>, job_id: String, client_id: Option<String>) {
    let (Ok(engine), Ok(jobs)) = (app.engine().cloned(), app.jobs()) else {
        return;
    };
    let Ok(mut watch) = jobs.watch(&job_id).await else {
        return;
    };
    let env = engine.env().clone();
    let mut translator = Translator::new(&job_id);
    let mut closing = app.closing.clone();
    let mut out = Vec::new();
    loop {
        let item = tokio::select! {
            item = watch.next() => item,
            _ = closed(&mut closing) => None,
        };
        let Some(item) = item else { break };
        match item {
            WatchItem::Event(event) => translator.event(&env, &event, &mut out),
            WatchItem::Frame(frame) => {
                if let Some(client) = client_id.as_deref()
                    && app.hub.is_connected(client)
                {
                    send_preview(&app, client, &frame).await;
                }
            }
            WatchItem::FramesDropped(_) | WatchItem::EventsSkipped(_) => {}
        }
        if let Some(client) = client_id.as_deref() {
            for msg in out.drain(..) {
                app.hub.send_json(client, &msg).await;
            }
        } else {
            out.clear();
        }
        if translator.finished().is_some() {
            break;
        }
    }
    app.prompts
        .set_messages(&job_id, translator.status_messages().to_vec());
    broadcast_status(&app);
}

async fn send_preview(app: &AppState, client: &str, frame: &sakuga_scheduler::engine::Frame) {
    let (w, h, pixels) = (frame.width, frame.height, frame.rgb8.clone());
    let encoded =
        tokio::task::spawn_blocking(move || crate::server::render::encode_png(w, h, &pixels)).await;
    match encoded {
        Ok(Ok(png)) => app.hub.try_send_binary(client, preview_frame(&png)),
        Ok(Err(e)) => tracing::warn!(error = %e, "encoding a preview frame"),
        Err(e) => tracing::warn!(error = %e, "preview encoder task"),
    }
}
