//! Bearer-token (or dashboard session) authentication and role checks for the admin API.
//!
//! Tokens are random secrets shown once; only their sha256 is stored. Every admin route
//! declares the least role it needs, and the check runs before any extractor, so an
//! anonymous caller learns nothing about the request it sent.

use axum::extract::{Request, State};
use axum::http::{header, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::error::ApiError;
use super::AppState;
use crate::core::model::{ApiToken, TokenRole};
use crate::core::session;

/// The authenticated caller, available to handlers as an extension.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    pub token_name: String,
    pub role: TokenRole,
}

impl Caller {
    /// How this caller appears in the audit trail.
    pub fn actor(&self) -> String {
        format!("token:{}", self.token_name)
    }
}

fn unauthorized(message: &str) -> Response {
    ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", message).into_response()
}

/// The session cookie's value, if the request carries one (`Cookie: a=b; bearman_session=…`).
pub fn session_cookie(headers: &axum::http::HeaderMap) -> Option<&str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == session::COOKIE_NAME)
        .map(|(_, value)| value)
        .filter(|value| !value.is_empty())
}

/// `Some(refusal)` when the request names an `Origin` that is not this host (what the
/// browser put in `Host`): a page elsewhere is trying to act with our cookie.
pub fn cross_origin(headers: &axum::http::HeaderMap) -> Option<Response> {
    let origin = headers.get(header::ORIGIN)?;
    let host = headers.get(header::HOST).and_then(|h| h.to_str().ok());
    let origin_host = origin
        .to_str()
        .ok()
        .and_then(|o| o.split_once("://"))
        .map(|(_, rest)| rest.trim_end_matches('/'));
    match (origin_host, host) {
        (Some(origin), Some(host)) if origin.eq_ignore_ascii_case(host) => None,
        _ => Some(
            ApiError::new(
                StatusCode::FORBIDDEN,
                "cross_origin",
                "the request's Origin is not this host; a session cookie acts only for pages served here",
            )
            .into_response(),
        ),
    }
}

/// The token a request authenticates with: `Authorization: Bearer` when present (the
/// API as it always was), else the dashboard's session cookie. A cookie-authenticated
/// request other than GET/HEAD must carry the session's CSRF token in
/// [`session::CSRF_HEADER`] and no foreign `Origin`.
async fn authenticate(
    state: &AppState,
    method: &Method,
    headers: &axum::http::HeaderMap,
) -> Result<ApiToken, Response> {
    if let Some(header_value) = headers.get(header::AUTHORIZATION) {
        let Some(secret) = header_value
            .to_str()
            .ok()
            .and_then(|value| value.strip_prefix("Bearer "))
            .map(str::trim)
        else {
            return Err(unauthorized("Authorization header must be Bearer <token>"));
        };
        return state
            .app
            .token_authenticate(secret)
            .await
            .map_err(|error| ApiError::from(error).into_response());
    }
    let Some(cookie) = session_cookie(headers) else {
        return Err(unauthorized(
            "missing Authorization: Bearer <token> header (or a dashboard session)",
        ));
    };
    let token = state
        .app
        .session_authenticate(cookie)
        .await
        .map_err(|error| ApiError::from(error).into_response())?;
    if !matches!(*method, Method::GET | Method::HEAD) {
        if let Some(refusal) = cross_origin(headers) {
            return Err(refusal);
        }
        let given = headers
            .get(session::CSRF_HEADER)
            .and_then(|value| value.to_str().ok())
            .unwrap_or_default();
        if !session::csrf_matches(cookie, &token.secret_sha256, given) {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "csrf",
                format!(
                    "a change made with a dashboard session needs its CSRF token in the {} header (GET /ui/session gives it)",
                    session::CSRF_HEADER
                ),
            )
            .into_response());
        }
    }
    Ok(token)
}

/// Middleware: admit the request only with a valid token (or session) of at least
/// `required` role.
pub async fn require_role(
    State(state): State<AppState>,
    required: TokenRole,
    mut request: Request,
    next: Next,
) -> Response {
    let token = match authenticate(&state, request.method(), request.headers()).await {
        Ok(token) => token,
        Err(refusal) => return refusal,
    };
    if token.role < required {
        return ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!(
                "token {} has role {}; this needs {}",
                token.name,
                token.role.as_str(),
                required.as_str()
            ),
        )
        .into_response();
    }
    state.app.token_record_use(&token).await;
    request.extensions_mut().insert(Caller {
        token_name: token.name,
        role: token.role,
    });
    next.run(request).await
}
