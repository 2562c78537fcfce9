//! HTTP plumbing: the shared handler state, the router and an accept loop that owns every
//! connection, so stopping the server really closes its sockets (kept-alive ones included).
//! Each connection is served by [`keep_alive::serve_connection`], which closes idle
//! keep-alive connections as uvicorn does.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, FromRef, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use tokio::net::TcpListener;
use tokio::task::JoinSet;

use crate::api::{embeddings, messages, responses, store::ResponseStore};
use crate::config::{LoraModule, SimConfig};
use crate::faults::{self, FaultControl};
use crate::keep_alive;
use crate::metrics::ExpositionInfo;
use crate::model_tokenizer::ModelTokenizer;
use crate::openai;
use crate::scheduler::EngineClient;

/// What every handler can reach.
#[derive(Debug, Clone)]
pub struct AppState {
    /// The configuration.
    pub cfg: Arc<SimConfig>,
    /// The model's tokenizer (`--tokenizer`); `None` for the stand-in.
    pub tokenizer: Option<Arc<ModelTokenizer>>,
    /// LoRA adapters served.
    pub loras: Arc<Vec<LoraModule>>,
    /// The engine.
    pub engine: EngineClient,
    /// Faults in force.
    pub faults: FaultControl,
    /// Static facts for `/metrics`.
    pub exposition: Arc<ExpositionInfo>,
    /// Stored Responses-API responses (`previous_response_id`).
    pub responses: Arc<ResponseStore>,
}

impl FromRef<AppState> for FaultControl {
    fn from_ref(st: &AppState) -> FaultControl {
        st.faults.clone()
    }
}

/// The routes of the simulator.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(openai::chat_completions))
        .route("/v1/completions", post(openai::completions))
        .route("/v1/responses", post(responses::create))
        .route("/v1/responses/:id", get(responses::retrieve))
        .route("/v1/messages", post(messages::create))
        .route("/v1/embeddings", post(embeddings::create))
        .route("/v1/models", get(openai::models))
        .route("/tokenize", post(openai::tokenize))
        .route("/detokenize", post(openai::detokenize))
        .route("/health", get(openai::health))
        .route("/version", get(openai::version))
        .route("/metrics", get(openai::metrics))
        .route("/reset_prefix_cache", post(reset_prefix_cache))
        .route(
            "/admin/faults",
            get(faults::get_faults)
                .put(faults::put_faults)
                .post(faults::put_faults)
                .delete(faults::delete_faults),
        )
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state)
}

/// Query of `POST /reset_prefix_cache`, vLLM's.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(default)]
struct ResetQuery {
    /// Preempt the running requests so the reset can succeed.
    reset_running_requests: bool,
    /// Also reset a KV connector's external cache (there is none: ignored).
    #[allow(dead_code)]
    reset_external: bool,
}

/// vLLM's `POST /reset_prefix_cache` (a dev endpoint there, `VLLM_SERVER_DEV_MODE=1`; always
/// served here): `{"success": bool}`. It fails while requests hold KV blocks, unless
/// `?reset_running_requests=true` preempts them. With KV events, `AllBlocksCleared` goes out
/// with the next step's batch.
async fn reset_prefix_cache(State(st): State<AppState>, Query(q): Query<ResetQuery>) -> Response {
    match st.engine.reset_prefix_cache(q.reset_running_requests).await {
        Ok(success) => Json(serde_json::json!({ "success": success })).into_response(),
        Err(e) => e.into_response(),
    }
}

/// Largest request body accepted (vLLM has no limit; long prompts must fit).
const MAX_BODY_BYTES: usize = 64 << 20;

/// Unknown paths: FastAPI's 404 body, as vLLM answers.
async fn not_found() -> (StatusCode, Json<serde_json::Value>) {
    (
        StatusCode::NOT_FOUND,
        Json(serde_json::json!({"detail": "Not Found"})),
    )
}

/// Accepts connections until the task is dropped or aborted; every connection task lives in
/// a [`JoinSet`] owned here, so they all end with it. A connection idle for
/// `keep_alive_timeout` after a response is closed; `None` keeps idle connections open.
pub async fn serve(listener: TcpListener, app: Router, keep_alive_timeout: Option<Duration>) {
    let mut conns: JoinSet<()> = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, _peer): (tokio::net::TcpStream, SocketAddr) = match accepted {
                    Ok(a) => a,
                    Err(_) => {
                        // e.g. too many open files: back off briefly instead of spinning
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                conns.spawn(keep_alive::serve_connection(stream, app.clone(), keep_alive_timeout));
            }
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}
