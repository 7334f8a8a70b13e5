//! The web dashboard at `/ui/`: static assets embedded in the binary, and login, logout
//! and the session's description. Everything else the page shows or does goes through
//! the admin API (`/api/v1`) with the session cookie, under the same route table and
//! role checks as a Bearer token.
//!
//! Architecture invariant: the dashboard is a client of the admin API; its only routes
//! that change anything are login and logout (an audit event each). It is mounted on the
//! admin listener only, never on the plain boot listener.

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::map_response;
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};

use super::auth::{cross_origin, session_cookie};
use super::error::ApiError;
use super::extract::JsonBody;
use super::AppState;
use crate::core::model::{TimestampMs, TokenRole};
use crate::core::session;

const INDEX_HTML: &str = include_str!("assets/index.html");
const APP_JS: &str = include_str!("assets/app.js");
const APP_CSS: &str = include_str!("assets/app.css");

/// No inline script or style, nothing from elsewhere, no framing.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; \
    style-src 'self'; img-src 'self' data:; connect-src 'self'; base-uri 'none'; \
    form-action 'self'; frame-ancestors 'none'";

/// The dashboard's routes, for the admin listener.
pub fn router() -> Router<AppState> {
    pages()
        .route("/ui/login", post(login))
        .route("/ui/logout", post(logout))
        .route("/ui/session", get(session_show))
        .layer(map_response(security_headers))
}

/// The dashboard for a read-only window onto a daemon that is not this process's to
/// serve (the simulator's `bearman-sim run --serve`): the same pages, and a fixed viewer
/// "session" with no cookie and no CSRF token, so the page shows no action. Never
/// mounted by `bearman serve` (`tests/tests/tidy.rs` checks only the simulator names it).
pub fn read_only_window_router() -> Router<AppState> {
    pages()
        .route(
            "/ui/session",
            get(|| async {
                Json(SessionView {
                    token: "read-only window".into(),
                    role: TokenRole::Viewer,
                    csrf: String::new(),
                    expires_at_ms: i64::MAX,
                })
            }),
        )
        .layer(map_response(security_headers))
}

/// The page and its assets, which both dashboards serve.
fn pages() -> Router<AppState> {
    Router::new()
        .route("/", get(|| async { Redirect::to("/ui/") }))
        .route("/ui", get(|| async { Redirect::to("/ui/") }))
        .route("/ui/", get(index))
        .route("/ui/app.js", get(app_js))
        .route("/ui/app.css", get(app_css))
}

/// The headers every dashboard response carries, errors included.
async fn security_headers(mut response: Response) -> Response {
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CONTENT_SECURITY_POLICY),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    headers
        .entry(header::CACHE_CONTROL)
        .or_insert(HeaderValue::from_static("no-store"));
    response
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            // Revalidate: a daemon upgrade changes the assets under the same names.
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

async fn index() -> Response {
    asset("text/html; charset=utf-8", INDEX_HTML)
}

async fn app_js() -> Response {
    asset("text/javascript; charset=utf-8", APP_JS)
}

async fn app_css() -> Response {
    asset("text/css; charset=utf-8", APP_CSS)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LoginRequest {
    /// The API token's secret; never stored, logged or echoed.
    token: String,
}

/// What the page learns of its session: who it is, what it may do, the CSRF token to
/// send with every change, and when it ends.
#[derive(Serialize)]
struct SessionView {
    token: String,
    role: TokenRole,
    csrf: String,
    expires_at_ms: TimestampMs,
}

fn set_cookie(state: &AppState, value: &str, max_age_s: i64) -> HeaderValue {
    let secure = if state.config.dashboard.secure_cookie {
        "; Secure"
    } else {
        ""
    };
    let text = format!(
        "{}={value}; Path=/; HttpOnly; SameSite=Strict; Max-Age={max_age_s}{secure}",
        session::COOKIE_NAME
    );
    HeaderValue::from_str(&text).expect("a session cookie is visible ASCII")
}

/// `POST /ui/login` `{"token": "bm_…"}`: checks the token and sets the session cookie.
async fn login(
    State(state): State<AppState>,
    headers: HeaderMap,
    JsonBody(request): JsonBody<LoginRequest>,
) -> Result<Response, Response> {
    if let Some(refusal) = cross_origin(&headers) {
        return Err(refusal);
    }
    let opened = state
        .app
        .session_open(request.token.trim(), state.config.dashboard.session_max_s)
        .await
        .map_err(|error| ApiError::from(error).into_response())?;
    let max_age_s = ((opened.expires_at_ms - state.app.now_ms()) / 1000).max(0);
    let view = SessionView {
        csrf: session::csrf_token(&opened.cookie_value, &opened.token.secret_sha256),
        token: opened.token.name,
        role: opened.token.role,
        expires_at_ms: opened.expires_at_ms,
    };
    let mut response = Json(view).into_response();
    response.headers_mut().insert(
        header::SET_COOKIE,
        set_cookie(&state, &opened.cookie_value, max_age_s),
    );
    Ok(response)
}

/// `POST /ui/logout`: clears the cookie (and audits the logout of a valid session).
async fn logout(State(state): State<AppState>, request: Request) -> Response {
    if let Some(refusal) = cross_origin(request.headers()) {
        return refusal;
    }
    if let Some(cookie) = session_cookie(request.headers()) {
        if let Err(error) = state.app.session_close(cookie).await {
            return ApiError::from(error).into_response();
        }
    }
    let mut response = StatusCode::NO_CONTENT.into_response();
    response
        .headers_mut()
        .insert(header::SET_COOKIE, set_cookie(&state, "", 0));
    response
}

/// `GET /ui/session`: the session the cookie names, with its CSRF token; 401 without one.
async fn session_show(State(state): State<AppState>, request: Request) -> Response {
    let Some(cookie) = session_cookie(request.headers()) else {
        return ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", "not logged in")
            .into_response();
    };
    let token = match state.app.session_authenticate(cookie).await {
        Ok(token) => token,
        Err(error) => return ApiError::from(error).into_response(),
    };
    let expires_at_ms = session::parse(cookie).map_or(0, |claim| claim.expires_at_ms);
    Json(SessionView {
        csrf: session::csrf_token(cookie, &token.secret_sha256),
        token: token.name,
        role: token.role,
        expires_at_ms,
    })
    .into_response()
}
