//! A deliberately small HTTP/1.1 client over any byte stream.
//!
//! The stage-1 agent ships in a RAM disk and the simulator's virtual nodes speak through
//! turmoil's sockets, so the client is generic over the stream and carries no TLS, no
//! pooling and no redirects: one request per connection (`Connection: close`), bounded
//! response size, bounded time (the caller wraps it in a timeout).

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Responses larger than this are refused; boot-protocol answers are a few KiB and the
/// largest admin listing of 10k nodes stays well below it.
pub const RESPONSE_BYTES_MAX: usize = 64 * 1024 * 1024;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    /// The head as received (status line and header lines), and where each header's
    /// trimmed name and value lie in it: one copy of the head, where a pair of strings
    /// per header cost two allocations each on every answer the agent reads.
    head: String,
    headers: Vec<HeaderSpan>,
    pub body: Vec<u8>,
}

/// Byte ranges of one header's name and value in [`Response`]'s head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct HeaderSpan {
    name: (u32, u32),
    value: (u32, u32),
}

impl Response {
    /// The first header called `name` (compared ignoring ASCII case), trimmed.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers()
            .find(|(key, _)| key.eq_ignore_ascii_case(name))
            .map(|(_, value)| value)
    }

    /// Every header as (name, value), in the order received.
    pub fn headers(&self) -> impl Iterator<Item = (&str, &str)> + '_ {
        let part = |(start, end): (u32, u32)| &self.head[start as usize..end as usize];
        self.headers
            .iter()
            .map(move |span| (part(span.name), part(span.value)))
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
    #[error("malformed response: {0}")]
    Malformed(String),
    #[error("response exceeds {RESPONSE_BYTES_MAX} bytes")]
    TooLarge,
    #[error("invalid url {0:?}: expected http://host[:port]/path")]
    InvalidUrl(String),
    #[error("invalid url {0:?}: expected http://host[:port]/path or https://host[:port]/path")]
    InvalidAdminUrl(String),
}

/// `http://host:port/path` split into its parts; only plain `http` is supported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpUrl {
    pub host: String,
    pub port: u16,
    pub path: String,
}

impl HttpUrl {
    pub fn parse(url: &str) -> Result<Self, HttpError> {
        let invalid = || HttpError::InvalidUrl(url.to_string());
        let rest = url.strip_prefix("http://").ok_or_else(invalid)?;
        Self::parse_after_scheme(rest, 80).ok_or_else(invalid)
    }

    /// `host[:port][/path]`, `default_port` when no port is given.
    fn parse_after_scheme(rest: &str, default_port: u16) -> Option<Self> {
        let (authority, path) = match rest.find('/') {
            Some(index) => (&rest[..index], &rest[index..]),
            None => (rest, "/"),
        };
        let (host, port) = match authority.rsplit_once(':') {
            Some((host, port)) if !host.ends_with(']') || authority.starts_with('[') => {
                (host, port.parse::<u16>().ok()?)
            }
            _ => (authority, default_port),
        };
        if host.is_empty() {
            return None;
        }
        Some(HttpUrl {
            host: host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string(),
            port,
            path: path.to_string(),
        })
    }

    /// `host:port`, the form socket connectors take.
    pub fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

/// How the admin API is reached: the CLI may use TLS; the boot protocol never does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    Http,
    Https,
}

/// An admin API URL, `http://` (port 80 by default) or `https://` (port 443). The
/// scheme is returned for the caller to set up TLS; [`HttpUrl::parse`], used by the boot
/// protocol, still takes `http://` only.
pub fn parse_admin_url(url: &str) -> Result<(Scheme, HttpUrl), HttpError> {
    let invalid = || HttpError::InvalidAdminUrl(url.to_string());
    let (scheme, rest, default_port) = if let Some(rest) = url.strip_prefix("https://") {
        (Scheme::Https, rest, 443)
    } else if let Some(rest) = url.strip_prefix("http://") {
        (Scheme::Http, rest, 80)
    } else {
        return Err(invalid());
    };
    // `[v6]` without a port: the shared parser (whose boot-protocol behaviour stays as
    // it is) would read the address's last group as the port.
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let (authority, path) = rest.split_at(authority_end);
    let with_port;
    let rest = if authority.starts_with('[') && authority.ends_with(']') {
        with_port = format!("{authority}:{default_port}{path}");
        with_port.as_str()
    } else {
        rest
    };
    let parsed = HttpUrl::parse_after_scheme(rest, default_port).ok_or_else(invalid)?;
    Ok((scheme, parsed))
}

/// Sends one request on `stream` and reads the whole response.
pub async fn send<S>(
    stream: &mut S,
    method: &str,
    host: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> Result<Response, HttpError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let body = body.unwrap_or_default();
    // Built piece by piece into one buffer sized up front (the agent sends one of these
    // per heartbeat; formatting machinery was a visible part of it).
    let headers_len: usize = headers
        .iter()
        .map(|(name, value)| name.len() + value.len() + 4)
        .sum();
    let mut bytes =
        Vec::with_capacity(method.len() + path.len() + host.len() + headers_len + body.len() + 96);
    for piece in [
        method,
        " ",
        path,
        " HTTP/1.1\r\nHost: ",
        host,
        "\r\nConnection: close\r\n",
    ] {
        bytes.extend_from_slice(piece.as_bytes());
    }
    for (name, value) in headers {
        for piece in [*name, ": ", *value, "\r\n"] {
            bytes.extend_from_slice(piece.as_bytes());
        }
    }
    if !body.is_empty() || method != "GET" {
        bytes.extend_from_slice(b"Content-Length: ");
        bytes.extend_from_slice(body.len().to_string().as_bytes());
        bytes.extend_from_slice(b"\r\n");
    }
    bytes.extend_from_slice(b"\r\n");
    bytes.extend_from_slice(body);
    stream.write_all(&bytes).await?;
    stream.flush().await?;
    read_response(stream).await
}

/// How much more room each read of a response asks for.
const READ_CHUNK_BYTES: usize = 8192;

async fn read_response<S: AsyncRead + Unpin>(stream: &mut S) -> Result<Response, HttpError> {
    // Read straight into the response's buffer: a fixed read buffer in this future
    // would be zeroed on every call and copied whenever the future moves.
    let mut buffer = Vec::with_capacity(READ_CHUNK_BYTES);
    // Where the search for the head's end resumes: bytes already searched are not
    // searched again after each read (all but the last three, which may begin it).
    let mut searched = 0;
    let header_end = loop {
        if let Some(position) = find(&buffer[searched..], b"\r\n\r\n") {
            break searched + position;
        }
        searched = buffer.len().saturating_sub(3);
        if buffer.len() > 64 * 1024 {
            return Err(HttpError::Malformed("headers exceed 64 KiB".into()));
        }
        buffer.reserve(READ_CHUNK_BYTES);
        let read = stream.read_buf(&mut buffer).await?;
        if read == 0 {
            return Err(HttpError::Malformed(
                "connection closed before headers ended".into(),
            ));
        }
    };
    let body = buffer[header_end + 4..].to_vec();
    buffer.truncate(header_end);
    let head = String::from_utf8(buffer)
        .map_err(|_| HttpError::Malformed("headers are not utf-8".into()))?;
    let (status, headers) = parse_head(&head)?;
    let mut response = Response {
        status,
        head,
        headers,
        body,
    };
    let content_length = response
        .header("content-length")
        .and_then(|value| value.parse::<usize>().ok());
    let chunked = response
        .header("transfer-encoding")
        .is_some_and(|value| value.eq_ignore_ascii_case("chunked"));
    loop {
        if let Some(length) = content_length {
            if length > RESPONSE_BYTES_MAX {
                return Err(HttpError::TooLarge);
            }
            if response.body.len() >= length {
                response.body.truncate(length);
                break;
            }
        }
        response.body.reserve(READ_CHUNK_BYTES);
        let read = stream.read_buf(&mut response.body).await?;
        if read == 0 {
            if let Some(length) = content_length {
                if response.body.len() < length {
                    return Err(HttpError::Malformed(
                        "body shorter than content-length".into(),
                    ));
                }
            }
            break;
        }
        if response.body.len() > RESPONSE_BYTES_MAX {
            return Err(HttpError::TooLarge);
        }
    }
    if chunked {
        response.body = dechunk(&response.body)?;
    }
    Ok(response)
}

/// The status code and the header spans of a response head (lines end in CRLF; a bare
/// LF is taken too). Header names and values are trimmed of ASCII blanks.
fn parse_head(head: &str) -> Result<(u16, Vec<HeaderSpan>), HttpError> {
    let bytes = head.as_bytes();
    // Each line found with `memchr` (vector compares), and its colon too: a byte loop
    // over the head for each was most of what reading an answer cost the agent.
    let mut next_line = {
        let mut start = 0;
        move || {
            if start > bytes.len() {
                return None;
            }
            let end = memchr::memchr(b'\n', &bytes[start..]).map_or(bytes.len(), |at| start + at);
            let line = &bytes[start..end];
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            let line_start = start;
            start = end + 1;
            Some((line_start, line))
        }
    };
    let (_, status_line) = next_line().unwrap_or_default();
    let status = status_line
        .split(|byte| byte.is_ascii_whitespace())
        .filter(|word| !word.is_empty())
        .nth(1)
        .and_then(|code| std::str::from_utf8(code).ok())
        .and_then(|code| code.parse::<u16>().ok())
        .ok_or_else(|| {
            HttpError::Malformed(format!(
                "bad status line {:?}",
                String::from_utf8_lossy(status_line)
            ))
        })?;
    let mut headers = Vec::with_capacity(12);
    while let Some((line_start, line)) = next_line() {
        let Some(colon) = memchr::memchr(b':', line) else {
            continue;
        };
        // Trimming ASCII blanks next to the colon keeps both parts on character
        // boundaries: the head is UTF-8 and blanks are single bytes.
        let span = |from: usize, part: &[u8]| {
            let trimmed = part.trim_ascii_start();
            let start = from + (part.len() - trimmed.len());
            let trimmed = trimmed.trim_ascii_end();
            (start as u32, (start + trimmed.len()) as u32)
        };
        headers.push(HeaderSpan {
            name: span(line_start, &line[..colon]),
            value: span(line_start + colon + 1, &line[colon + 1..]),
        });
    }
    Ok((status, headers))
}

fn dechunk(mut data: &[u8]) -> Result<Vec<u8>, HttpError> {
    let mut out = Vec::with_capacity(data.len());
    loop {
        let line_end =
            find(data, b"\r\n").ok_or_else(|| HttpError::Malformed("bad chunk header".into()))?;
        let size_text = std::str::from_utf8(&data[..line_end])
            .map_err(|_| HttpError::Malformed("bad chunk size".into()))?;
        let size_text = size_text.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_text, 16)
            .map_err(|_| HttpError::Malformed(format!("bad chunk size {size_text:?}")))?;
        data = &data[line_end + 2..];
        if size == 0 {
            return Ok(out);
        }
        if data.len() < size + 2 {
            return Err(HttpError::Malformed("truncated chunk".into()));
        }
        out.extend_from_slice(&data[..size]);
        data = &data[size + 2..];
    }
}

/// Where `needle` (a few bytes: a line or head end) first occurs in `haystack`.
fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    let (&first, rest) = needle.split_first()?;
    let mut from = 0;
    // Scan for the first byte and compare the rest only there: a window per byte
    // compared a slice at every position.
    while let Some(offset) = memchr::memchr(first, &haystack[from..]) {
        let at = from + offset;
        if haystack[at + 1..].starts_with(rest) {
            return Some(at);
        }
        from = at + 1;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_parse_handles_ports_paths_and_refuses_https() {
        let url = HttpUrl::parse("http://10.0.2.2:8080/ipxe/x").unwrap();
        assert_eq!(
            (url.host.as_str(), url.port, url.path.as_str()),
            ("10.0.2.2", 8080, "/ipxe/x")
        );
        let url = HttpUrl::parse("http://bearman").unwrap();
        assert_eq!((url.port, url.path.as_str()), (80, "/"));
        assert!(HttpUrl::parse("https://bearman/").is_err());
        assert!(HttpUrl::parse("http://h:notaport/").is_err());
    }

    #[test]
    fn admin_url_takes_http_and_https_with_their_default_ports() {
        let (scheme, url) = parse_admin_url("https://bearman.example:8443/x").unwrap();
        assert_eq!(scheme, Scheme::Https);
        assert_eq!(
            (url.host.as_str(), url.port, url.path.as_str()),
            ("bearman.example", 8443, "/x")
        );
        let (scheme, url) = parse_admin_url("https://10.0.0.1").unwrap();
        assert_eq!(
            (scheme, url.port, url.path.as_str()),
            (Scheme::Https, 443, "/")
        );
        let (scheme, url) = parse_admin_url("https://[fd00::1]").unwrap();
        assert_eq!(
            (scheme, url.host.as_str(), url.port),
            (Scheme::Https, "fd00::1", 443)
        );
        assert_eq!(url.authority(), "[fd00::1]:443");
        let (scheme, url) = parse_admin_url("http://127.0.0.1:8080").unwrap();
        assert_eq!((scheme, url.port), (Scheme::Http, 8080));
        assert_eq!(parse_admin_url("http://h").unwrap().1.port, 80);
        for bad in [
            "ftp://h/",
            "https://",
            "https://h:notaport/",
            "HTTPS://h",
            "h:80",
        ] {
            let error = parse_admin_url(bad).unwrap_err();
            assert!(
                matches!(error, HttpError::InvalidAdminUrl(_)),
                "{bad}: {error}"
            );
        }
        // The boot protocol's parser is unchanged.
        assert!(HttpUrl::parse("https://bearman/").is_err());
        let (_, url) = parse_admin_url("https://[fd00::1]:8443/p").unwrap();
        assert_eq!(
            (url.host.as_str(), url.port, url.path.as_str()),
            ("fd00::1", 8443, "/p")
        );
    }

    #[test]
    fn find_locates_the_first_whole_needle() {
        assert_eq!(find(b"ab\r\n\r\ncd", b"\r\n\r\n"), Some(2));
        assert_eq!(find(b"\r\r\n\r\n", b"\r\n\r\n"), Some(1));
        assert_eq!(find(b"a\r\nb\r\n\r", b"\r\n\r\n"), None);
        assert_eq!(find(b"x\r\n", b"\r\n"), Some(1));
        assert_eq!(find(b"", b"\r\n"), None);
        assert_eq!(find(b"abc", b""), None);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn writes_the_request_head_and_body_as_http_1_1() {
        for (method, body, expected) in [
            (
                "POST",
                Some(&b"{}"[..]),
                &b"POST /p HTTP/1.1\r\nHost: h:80\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"[..],
            ),
            (
                "GET",
                None,
                b"GET /p HTTP/1.1\r\nHost: h:80\r\nConnection: close\r\nContent-Type: application/json\r\n\r\n",
            ),
            (
                "POST",
                None,
                b"POST /p HTTP/1.1\r\nHost: h:80\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: 0\r\n\r\n",
            ),
        ] {
            let (mut client, mut server) = tokio::io::duplex(1 << 16);
            // Reads what is expected, then hangs up without answering.
            let server_task = async move {
                let mut request = Vec::new();
                while request.len() < expected.len() {
                    let mut chunk = [0u8; 512];
                    let read = server.read(&mut chunk).await.unwrap();
                    if read == 0 {
                        break;
                    }
                    request.extend_from_slice(&chunk[..read]);
                }
                request
            };
            let headers = [("Content-Type", "application/json")];
            let client_task = send(&mut client, method, "h:80", "/p", &headers, body);
            let (request, sent) = tokio::join!(server_task, client_task);
            assert_eq!(String::from_utf8_lossy(&request), String::from_utf8_lossy(expected));
            assert!(sent.is_err(), "no answer came");
        }
    }

    /// `GET /` answered with `answer` by a server that reads the request once.
    async fn get_answered_with(answer: &'static [u8]) -> Result<Response, HttpError> {
        let (mut client, mut server) = tokio::io::duplex(1 << 16);
        let server_task = async move {
            let mut request = vec![0u8; 1024];
            let _ = server.read(&mut request).await.unwrap();
            server.write_all(answer).await.unwrap();
        };
        let client_task = send(&mut client, "GET", "h", "/", &[], None);
        tokio::join!(server_task, client_task).1
    }

    #[tokio::test(flavor = "current_thread")]
    async fn reads_headers_by_line() {
        let response = get_answered_with(
            b"HTTP/1.1 404 Not Found\r\nX-One:  a b \r\ncontent-length: 3\r\n\r\nabc",
        )
        .await
        .unwrap();
        assert_eq!(response.status, 404);
        assert_eq!(response.header("x-one"), Some("a b"));
        assert_eq!(response.headers().count(), 2);
        assert_eq!(response.body, b"abc");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn keeps_every_header_in_order_trimmed_with_bare_line_feeds_too() {
        let response = get_answered_with(
            "HTTP/1.1 200 OK\nServer:\tbearman \r\nno colon here\r\nX-Note: caf\u{e9} : ok\r\nContent-Length:0\r\n\r\n"
                .as_bytes(),
        )
        .await
        .unwrap();
        let headers: Vec<_> = response.headers().collect();
        assert_eq!(
            headers,
            [
                ("Server", "bearman"),
                ("X-Note", "caf\u{e9} : ok"),
                ("Content-Length", "0")
            ]
        );
        assert_eq!(response.header("CONTENT-LENGTH"), Some("0"));
        assert_eq!(response.header("missing"), None);
        assert!(response.body.is_empty());
    }

    #[tokio::test(flavor = "current_thread")]
    async fn refuses_a_head_without_a_status_code() {
        let error = get_answered_with(b"HTTP/1.1\r\nA: b\r\n\r\n")
            .await
            .unwrap_err();
        assert!(
            matches!(error, HttpError::Malformed(ref text) if text.contains("bad status line")),
            "{error}"
        );
    }

    #[tokio::test(flavor = "current_thread")]
    async fn reads_content_length_and_chunked_bodies() {
        let response = get_answered_with(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
        )
        .await
        .unwrap();
        assert_eq!(response.status, 200);
        assert_eq!(response.body, b"abcde");
    }
}
