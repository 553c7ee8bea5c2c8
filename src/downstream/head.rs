//! The bounds of a request head, kept by the client connection itself.
//!
//! Pingora reads a request head with a timeout per read (none at all for
//! the next head of a kept-alive connection) into a buffer that may grow
//! to 1 MiB. [`BoundedStream`] sits between the socket and Pingora and
//! enforces what a serious edge proxy promises (haproxy's
//! `timeout http-request` and `timeout http-keep-alive`, nginx's
//! `client_header_timeout` and `keepalive_timeout`, Envoy's
//! `max_request_headers_kb`):
//!
//! - a kept-alive connection may wait for its next request for the idle
//!   timeout, then it is closed;
//! - a head must be complete within the head deadline, counted from its
//!   first byte (from the accept for a connection's first request), in
//!   total, however slowly the bytes trickle; then the client gets 408;
//! - a head may hold at most `max_bytes`: reads are cut at the budget, so
//!   Pingora never buffers more, and a head that needs more gets 431.
//!
//! The stream cannot tell where a head ends and a body begins; the proxy
//! tells it, through [`BoundedStream::head_read`] once Pingora has parsed
//! the head and [`BoundedStream::request_done`] when the exchange is over.
//! An HTTP/2 connection is bounded by its codec instead (header list size,
//! idle timeout), so its preface opens the stream for good.

use std::fmt;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use pingora::protocols::{
    GetProxyDigest, GetSocketDigest, GetTimingDigest, Peek, Shutdown, SocketDigest, Ssl, Stream,
    TimingDigest, UniqueID, UniqueIDType, ALPN,
};

use pingora::protocols::raw_connect::ProxyDigest;
use pingora::protocols::tls::SslDigest;
use pingora::tls::ssl::SslRef;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

use super::Gate;
use crate::metrics::metrics;

/// The limits one request head is read under.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeadLimits {
    /// From the first byte of a head (or the accept) to its end.
    pub deadline: Duration,
    /// How long a kept-alive connection waits for its next request;
    /// `None` waits as long as the client keeps it open.
    pub idle: Option<Duration>,
    /// The most bytes a head may hold: request line, headers, line ends.
    pub max_bytes: usize,
}

/// Where the current limits come from: read when a request begins, so a
/// reload applies to the next request of an open connection.
pub type LimitSource = Arc<dyn Fn() -> HeadLimits + Send + Sync>;

/// What HTTP/2 clients send first (RFC 9113, section 3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

const REQUEST_TIMEOUT: &[u8] = b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\n\
Content-Type: text/plain\r\nContent-Length: 46\r\n\r\n\
the request head did not arrive in time (408)\n";

const HEAD_TOO_LARGE: &[u8] = b"HTTP/1.1 431 Request Header Fields Too Large\r\n\
Connection: close\r\nContent-Type: text/plain\r\nContent-Length: 61\r\n\r\n\
the request head is larger than max_request_headers_kb (431)\n";

// What the proxy said, for the next read to act on.
const MARK_NONE: u8 = 0;
const MARK_HEAD_READ: u8 = 1;
const MARK_REQUEST_DONE: u8 = 2;

/// How long a refusal may take to write, and how long the client's
/// remaining bytes are then read and dropped (nginx's lingering close), so
/// that closing with unread input does not reset the connection before
/// the client has read the refusal.
const REFUSAL_GRACE: Duration = Duration::from_secs(2);

/// How often an idle connection asks whether the gateway is at its
/// connection cap, and closes itself if so.
const PRESSURE_CHECK: Duration = Duration::from_secs(1);

enum Phase {
    /// Between requests of a kept-alive connection.
    Idle,
    /// Reading a head; `left` more bytes may come before the deadline.
    Head {
        left: usize,
        received: usize,
    },
    /// A body, a response, an upgraded stream or HTTP/2: not bounded here.
    Open,
    /// Writing the refusal, then the connection ends.
    Refusing {
        reply: &'static [u8],
        written: usize,
    },
    /// The refusal is out; the client's bytes are read and dropped until
    /// it closes or the grace ends.
    Lingering,
    Closed,
}

/// A client connection that bounds its request heads. See the module.
pub struct BoundedStream {
    inner: Stream,
    limits: LimitSource,
    gate: Arc<Gate>,
    current: HeadLimits,
    phase: Phase,
    /// Set by the proxy through a shared reference; read by the next read.
    mark: AtomicU8,
    /// How many bytes of the HTTP/2 preface the connection has matched,
    /// while it still might be one.
    preface: Option<usize>,
    /// Bytes read to answer Pingora's peek, given to its next read.
    peeked: Vec<u8>,
    deadline: Instant,
    timer: Option<Pin<Box<Sleep>>>,
}

impl BoundedStream {
    /// Starts bounding a new connection: its first head (or, with ALPN h2,
    /// the HTTP/2 preface) is due within the deadline from now.
    pub fn new(inner: Stream, limits: LimitSource, gate: Arc<Gate>) -> BoundedStream {
        let current = limits();
        BoundedStream {
            inner,
            limits,
            gate,
            current,
            phase: Phase::Head {
                left: current.max_bytes,
                received: 0,
            },
            mark: AtomicU8::new(MARK_NONE),
            preface: Some(0),
            peeked: Vec::new(),
            deadline: Instant::now() + current.deadline,
            timer: None,
        }
    }

    /// The connection under a Pingora stream, if it is one.
    pub fn of(stream: &Stream) -> Option<&BoundedStream> {
        (**stream).as_any().downcast_ref::<BoundedStream>()
    }

    /// Pingora has parsed the head: what follows is not bounded here.
    pub fn head_read(&self) {
        self.mark.store(MARK_HEAD_READ, Ordering::Relaxed);
    }

    /// The exchange is over; the connection waits for its next request.
    pub fn request_done(&self) {
        self.mark.store(MARK_REQUEST_DONE, Ordering::Relaxed);
    }

    fn take_mark(&mut self) {
        match self.mark.swap(MARK_NONE, Ordering::Relaxed) {
            MARK_HEAD_READ => {
                if matches!(self.phase, Phase::Head { .. } | Phase::Idle) {
                    self.phase = Phase::Open;
                }
            }
            MARK_REQUEST_DONE => {
                if matches!(self.phase, Phase::Open | Phase::Head { .. }) {
                    self.current = (self.limits)();
                    self.phase = Phase::Idle;
                    self.preface = None;
                    self.deadline = match self.current.idle {
                        Some(idle) => Instant::now() + idle,
                        None => far_future(),
                    };
                }
            }
            _ => {}
        }
    }

    /// Polls the timer for `deadline`; `Ready` once it has passed.
    fn poll_until(&mut self, deadline: Instant, cx: &mut Context<'_>) -> Poll<()> {
        let timer = self
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if timer.deadline() != deadline {
            timer.as_mut().reset(deadline);
        }
        timer.as_mut().poll(cx)
    }

    /// Polls the phase's deadline. An idle connection wakes every
    /// [`PRESSURE_CHECK`] on the way, to give its place up when the gateway
    /// is refusing connections (as nginx reuses idle keep-alive connections
    /// when it runs out).
    fn poll_deadline(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if !matches!(self.phase, Phase::Idle) {
            return self.poll_until(self.deadline, cx);
        }
        loop {
            let now = Instant::now();
            if now >= self.deadline {
                return Poll::Ready(());
            }
            let due = self.timer.as_ref().map(|t| t.deadline());
            if due.is_some_and(|due| due <= now) && self.gate.is_refusing() {
                return Poll::Ready(());
            }
            let next = match due {
                Some(due) if due > now && due <= self.deadline => due,
                _ => (now + PRESSURE_CHECK).min(self.deadline),
            };
            futures::ready!(self.poll_until(next, cx));
        }
    }

    /// The deadline passed: an idle connection, or one that never sent a
    /// byte, is closed quietly (browsers open spare connections they may
    /// never use); a half-sent head gets 408.
    fn expire(&mut self) {
        match self.phase {
            Phase::Idle | Phase::Head { received: 0, .. } => {
                metrics().downstream_closed("idle_timeout");
                self.phase = Phase::Closed;
            }
            _ => {
                metrics().downstream_closed("head_timeout");
                self.refuse(REQUEST_TIMEOUT);
            }
        }
    }

    fn refuse(&mut self, reply: &'static [u8]) {
        self.phase = Phase::Refusing { reply, written: 0 };
        self.deadline = Instant::now() + REFUSAL_GRACE;
    }

    /// Counts bytes a head read received, and spots the HTTP/2 preface.
    fn received(&mut self, bytes: &[u8]) {
        if let Phase::Idle = self.phase {
            self.phase = Phase::Head {
                left: self.current.max_bytes,
                received: 0,
            };
            self.deadline = Instant::now() + self.current.deadline;
        }
        if let Phase::Head { left, received } = &mut self.phase {
            *left = left.saturating_sub(bytes.len());
            *received += bytes.len();
        }
        if let Some(matched) = self.preface {
            let want = &H2_PREFACE[matched..];
            let n = want.len().min(bytes.len());
            if bytes[..n] != want[..n] {
                self.preface = None;
            } else if matched + n == H2_PREFACE.len() {
                // HTTP/2 bounds its own frames from here.
                self.preface = None;
                self.phase = Phase::Open;
            } else {
                self.preface = Some(matched + n);
            }
        }
    }

    /// Writes the refusal, then half-closes and lingers. `Pending` while
    /// it is under way; `Ready` once the connection is closed.
    fn poll_refusal(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            let step = match &mut self.phase {
                Phase::Refusing { reply, written } if *written < reply.len() => {
                    match Pin::new(&mut self.inner).poll_write(cx, &reply[*written..]) {
                        Poll::Ready(Ok(n)) if n > 0 => {
                            *written += n;
                            continue;
                        }
                        Poll::Ready(_) => Poll::Ready(false),
                        Poll::Pending => Poll::Pending,
                    }
                }
                Phase::Refusing { .. } => {
                    match Pin::new(&mut self.inner).poll_flush(cx) {
                        Poll::Ready(Ok(())) => {
                            // A FIN (or TLS close_notify) after the reply.
                            let _ = Pin::new(&mut self.inner).poll_shutdown(cx);
                            self.phase = Phase::Lingering;
                            continue;
                        }
                        Poll::Ready(Err(_)) => Poll::Ready(false),
                        Poll::Pending => Poll::Pending,
                    }
                }
                Phase::Lingering => {
                    let mut scratch = [0u8; 4096];
                    let mut sink = ReadBuf::new(&mut scratch);
                    match Pin::new(&mut self.inner).poll_read(cx, &mut sink) {
                        Poll::Ready(Ok(())) if !sink.filled().is_empty() => {
                            if Instant::now() < self.deadline {
                                continue;
                            }
                            Poll::Ready(false)
                        }
                        Poll::Ready(_) => Poll::Ready(false),
                        Poll::Pending => Poll::Pending,
                    }
                }
                _ => Poll::Ready(false),
            };
            match step {
                Poll::Ready(_) => {
                    self.phase = Phase::Closed;
                    return Poll::Ready(());
                }
                Poll::Pending => {
                    futures::ready!(self.poll_deadline(cx));
                    self.phase = Phase::Closed;
                    return Poll::Ready(());
                }
            }
        }
    }

    fn poll_head_read(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let left = match self.phase {
            Phase::Head { left, .. } => left,
            _ => self.current.max_bytes,
        };
        if left == 0 {
            metrics().downstream_closed("head_too_large");
            self.refuse(HEAD_TOO_LARGE);
            return Poll::Ready(Ok(()));
        }
        // Read into at most `left` bytes of the caller's buffer, so no more
        // than the budget ever reaches Pingora's.
        let room = buf.remaining().min(left);
        if !self.peeked.is_empty() {
            let n = room.min(self.peeked.len());
            let bytes: Vec<u8> = self.peeked.drain(..n).collect();
            buf.put_slice(&bytes);
            self.received(&bytes);
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        let polled = if buf.remaining() <= left {
            // The caller's buffer cannot take more than the budget: read
            // into it directly (no copy, no zeroing).
            Pin::new(&mut self.inner).poll_read(cx, buf)
        } else {
            let mut limited = ReadBuf::new(buf.initialize_unfilled_to(room));
            let polled = Pin::new(&mut self.inner).poll_read(cx, &mut limited);
            let read = limited.filled().len();
            buf.advance(read);
            polled
        };
        match polled {
            Poll::Ready(Ok(())) => {}
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Pending => {
                futures::ready!(self.poll_deadline(cx));
                self.expire();
                return Poll::Ready(Ok(()));
            }
        }
        if buf.filled().len() > before {
            self.received(&buf.filled()[before..]);
        }
        Poll::Ready(Ok(()))
    }
}

impl BoundedStream {
    fn is_refused(&self) -> bool {
        matches!(
            self.phase,
            Phase::Refusing { .. } | Phase::Lingering | Phase::Closed
        )
    }
}

/// A deadline that never comes, for connections without an idle timeout.
fn far_future() -> Instant {
    Instant::now() + crate::config::bounds::MAX_DURATION
}

impl AsyncRead for BoundedStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.take_mark();
        loop {
            match this.phase {
                Phase::Open => return Pin::new(&mut this.inner).poll_read(cx, buf),
                // The end of the stream, as Pingora sees it.
                Phase::Closed => return Poll::Ready(Ok(())),
                Phase::Refusing { .. } | Phase::Lingering => {
                    futures::ready!(this.poll_refusal(cx));
                }
                Phase::Idle | Phase::Head { .. } => {
                    futures::ready!(this.poll_head_read(cx, buf))?;
                    if matches!(this.phase, Phase::Refusing { .. } | Phase::Closed) {
                        continue;
                    }
                    return Poll::Ready(Ok(()));
                }
            }
        }
    }
}

impl AsyncWrite for BoundedStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.is_refused() {
            // The refusal was the connection's last word.
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        Pin::new(&mut this.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.is_refused() {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        Pin::new(&mut this.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[async_trait]
impl Shutdown for BoundedStream {
    async fn shutdown(&mut self) {
        self.inner.shutdown().await
    }
}

#[async_trait]
impl Peek for BoundedStream {
    /// Pingora peeks at a cleartext connection's first 24 bytes for the
    /// HTTP/2 preface, and its own peek waits until all 24 have come: a
    /// shorter request (`GET / HTTP/1.0` and a blank line) would wait for
    /// ever. Here the wait ends at the first byte that is not the
    /// preface's, or at the head's deadline; the bytes read go to the
    /// next read.
    async fn try_peek(&mut self, buf: &mut [u8]) -> io::Result<bool> {
        let wanted = buf.len().min(H2_PREFACE.len());
        let read_more = async {
            while self.peeked.len() < wanted && H2_PREFACE.starts_with(&self.peeked) {
                let mut chunk = [0u8; 24];
                let n = self
                    .inner
                    .read(&mut chunk[..wanted - self.peeked.len()])
                    .await?;
                if n == 0 {
                    return Err(io::Error::from(io::ErrorKind::UnexpectedEof));
                }
                self.peeked.extend_from_slice(&chunk[..n]);
            }
            Ok(())
        };
        match tokio::time::timeout_at(self.deadline, read_more).await {
            Ok(Ok(())) => {
                let n = self.peeked.len().min(buf.len());
                buf[..n].copy_from_slice(&self.peeked[..n]);
                buf[n..].fill(0);
                Ok(true)
            }
            Ok(Err(e)) => Err(e),
            Err(_) => {
                if self.peeked.is_empty() {
                    metrics().downstream_closed("idle_timeout");
                    self.phase = Phase::Closed;
                    Err(io::ErrorKind::TimedOut.into())
                } else {
                    // Let the head read answer 408 for what did come.
                    let n = self.peeked.len().min(buf.len());
                    buf[..n].copy_from_slice(&self.peeked[..n]);
                    buf[n..].fill(0);
                    Ok(true)
                }
            }
        }
    }
}

impl UniqueID for BoundedStream {
    fn id(&self) -> UniqueIDType {
        self.inner.id()
    }
}

impl Ssl for BoundedStream {
    fn get_ssl(&self) -> Option<&SslRef> {
        self.inner.get_ssl()
    }

    fn get_ssl_digest(&self) -> Option<Arc<SslDigest>> {
        self.inner.get_ssl_digest()
    }

    fn selected_alpn_proto(&self) -> Option<ALPN> {
        self.inner.selected_alpn_proto()
    }
}

impl GetTimingDigest for BoundedStream {
    fn get_timing_digest(&self) -> Vec<Option<TimingDigest>> {
        self.inner.get_timing_digest()
    }

    fn get_read_pending_time(&self) -> Duration {
        self.inner.get_read_pending_time()
    }

    fn get_write_pending_time(&self) -> Duration {
        self.inner.get_write_pending_time()
    }
}

impl GetProxyDigest for BoundedStream {
    fn get_proxy_digest(&self) -> Option<Arc<ProxyDigest>> {
        self.inner.get_proxy_digest()
    }

    fn set_proxy_digest(&mut self, digest: ProxyDigest) {
        self.inner.set_proxy_digest(digest)
    }
}

impl GetSocketDigest for BoundedStream {
    fn get_socket_digest(&self) -> Option<Arc<SocketDigest>> {
        self.inner.get_socket_digest()
    }

    fn set_socket_digest(&mut self, digest: SocketDigest) {
        self.inner.set_socket_digest(digest)
    }
}

impl fmt::Debug for BoundedStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BoundedStream")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_are_whole_responses() {
        for reply in [REQUEST_TIMEOUT, HEAD_TOO_LARGE] {
            let mut headers = [httparse::EMPTY_HEADER; 8];
            let mut response = httparse::Response::new(&mut headers);
            let httparse::Status::Complete(head) = response.parse(reply).unwrap() else {
                panic!("incomplete: {}", String::from_utf8_lossy(reply));
            };
            let length = response
                .headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                .map(|h| {
                    std::str::from_utf8(h.value)
                        .unwrap()
                        .parse::<usize>()
                        .unwrap()
                });
            assert_eq!(length, Some(reply.len() - head));
        }
    }
}
