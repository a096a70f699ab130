//! The agent's side: a root-only Unix socket answering the CNI plugin.

use std::{os::unix::fs::PermissionsExt as _, path::Path, sync::Arc, time::Duration};

use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader},
    net::{UnixListener, UnixStream},
};
use tracing::Instrument as _;

use super::{MAX_MESSAGE, Request, Response};
use crate::{desired::CniBinding, node::Node};

/// Binds the socket (replacing a stale one) so only root can use it.
pub fn bind(path: &Path) -> anyhow::Result<UnixListener> {
    use anyhow::Context as _;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
        Err(err) => return Err(err).with_context(|| format!("removing the stale socket {}", path.display())),
    }
    let listener = UnixListener::bind(path).with_context(|| format!("listening on {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("restricting {} to root", path.display()))?;
    Ok(listener)
}

/// Answers the plugin's requests; an ADD waits up to `enrol_timeout` for the pod's capture.
pub async fn serve(listener: UnixListener, node: Arc<Node>, enrol_timeout: Duration) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let node = node.clone();
                tokio::spawn(async move {
                    if let Err(err) = answer(stream, &node, enrol_timeout).await {
                        tracing::warn!(error = %err, "CNI plugin request failed");
                    }
                });
            }
            Err(err) => {
                tracing::warn!(error = %err, "CNI socket accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn answer(stream: UnixStream, node: &Node, enrol_timeout: Duration) -> std::io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut line = Vec::new();
    let mut reader = BufReader::new(read).take(MAX_MESSAGE as u64 + 1);
    tokio::time::timeout(Duration::from_secs(5), reader.read_until(b'\n', &mut line))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no request within 5 s"))??;
    let response = if line.len() > MAX_MESSAGE {
        refused(format!("request longer than {MAX_MESSAGE} bytes"))
    } else {
        match serde_json::from_slice::<Request>(&line) {
            Ok(request) => {
                let span = tracing::info_span!("cni", command = command(&request));
                handle(request, node, enrol_timeout).instrument(span).await
            }
            Err(err) => refused(format!("malformed request: {err}")),
        }
    };
    let mut json = serde_json::to_vec(&response).unwrap_or_default();
    json.push(b'\n');
    write.write_all(&json).await
}

fn command(request: &Request) -> &'static str {
    match request {
        Request::Add { .. } => "add",
        Request::Del { .. } => "del",
        Request::Check { .. } => "check",
        Request::Status => "status",
    }
}

fn refused(message: String) -> Response {
    Response { ok: false, enrolled: false, message }
}

async fn handle(request: Request, node: &Node, enrol_timeout: Duration) -> Response {
    let name = command(&request);
    let (response, outcome) = match request {
        Request::Add { pod, container_id, netns, ip, wait_secs } => {
            let binding = CniBinding { container_id, netns, ip };
            let enrol_timeout =
                if wait_secs > 0 { enrol_timeout.min(Duration::from_secs(wait_secs)) } else { enrol_timeout };
            let started = std::time::Instant::now();
            match node.cni_add(pod.clone(), binding, enrol_timeout).await {
                Ok(true) => {
                    tracing::info!(pod = %pod, took_ms = started.elapsed().as_millis() as u64, "CNI: pod captured before it starts");
                    (
                        Response { ok: true, enrolled: true, message: format!("pod {pod} is captured") },
                        "enrolled",
                    )
                }
                Ok(false) => (
                    Response { ok: true, enrolled: false, message: format!("pod {pod} is not in the mesh") },
                    "outside",
                ),
                Err(why) => {
                    tracing::error!(pod = %pod, error = %why, "CNI: refusing to let the pod start uncaptured");
                    (refused(why), "failed")
                }
            }
        }
        Request::Del { pod, container_id } => {
            let removed = node.cni_del(&pod, &container_id).await;
            let message =
                if removed { format!("pod {pod} released") } else { format!("pod {pod}: nothing held") };
            (Response { ok: true, enrolled: false, message }, if removed { "removed" } else { "unknown" })
        }
        Request::Check { pod } => match node.cni_check(&pod).await {
            Ok(enrolled) => (Response { ok: true, enrolled, message: String::new() }, "ok"),
            Err(why) => (refused(why), "failed"),
        },
        Request::Status => {
            (Response { ok: node.is_ready(), enrolled: false, message: node_state(node) }, "status")
        }
    };
    node.metrics.count_cni_request(name, outcome);
    response
}

fn node_state(node: &Node) -> String {
    if node.is_ready() { "ready".into() } else { node.not_ready_reason().into() }
}
