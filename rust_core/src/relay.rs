//! The native stream relay: one thread, one epoll, every stream handed over to it.
//!
//! Python relays a stream up to its first token and sends the response head; then, when
//! the hand-off is safe (plain HTTP upstream, no output limit, the client's transport
//! with nothing left to write), it gives the relay duplicates of both sockets, the reply
//! bytes its client read so far (for the body framing's state) and the tap's partial
//! event. From then on each read of the upstream socket is decoded ([`BodyDecoder`]),
//! its complete events found ([`SseScanner`]) and written to the client in one
//! HTTP/1.1 chunk (`len\r\n...\r\n`, as uvicorn frames a body), with no Python on the
//! way. The stream ends at the body's end, an upstream error or EOF, a silence or total
//! timeout, or the client leaving (a failed write, or EOF/HUP on its socket, which the
//! relay watches without reading); then both duplicates are closed and the outcome is
//! queued for Python, whose event loop is woken through an eventfd.
//!
//! A client that does not keep up: its pending bytes are held, and past
//! [`HIGH_WATER`] the upstream socket is not read until they are written.
//!
//! Everything a stream's fds are used for happens under one lock, so once
//! [`Relay::cancel`] returns the relay touches neither socket again.

#![allow(unsafe_code)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::sse::{BodyDecoder, SseScanner};

/// Client bytes pending past which the upstream is not read.
pub const HIGH_WATER: usize = 256 << 10;
const READ_BYTES: usize = 64 << 10;
const WAKE: u64 = u64::MAX;

/// How a handed-over stream ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// The body's end (a chunked body's last chunk, its length, or a clean EOF).
    Ended = 0,
    /// The upstream broke the reply: an error, EOF before the body's end, bad framing.
    Broken = 1,
    /// The client left or a write to it failed.
    ClientLeft = 2,
    /// No byte from the upstream for the silence timeout, or the total one passed.
    TimedOut = 3,
    /// No event end within `MAX_EVENT_BYTES`.
    NotEvents = 4,
}

#[derive(Debug)]
pub struct Finished {
    pub id: u64,
    pub end: End,
    pub done: bool,
    pub error: bool,
    pub usage: Option<Vec<u8>>,
    pub collected: Vec<u8>,
    pub message: &'static str,
}

struct Stream {
    up: i32,
    client: i32,
    decoder: BodyDecoder,
    scanner: SseScanner,
    out: Vec<u8>,
    out_at: usize,
    reading: bool,
    writing: bool,
    ending: Option<(End, &'static str)>,
    last_read: Instant,
    silence: Duration,
    total_at: Instant,
}

struct Inner {
    streams: HashMap<u64, Stream>,
    finished: Vec<Finished>,
    next_id: u64,
    stop: bool,
}

struct Shared {
    inner: Mutex<Inner>,
    epfd: i32,
    wake_fd: i32,
    notify_fd: i32,
}

/// The relay: its thread runs until it is dropped.
pub struct Relay {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

fn ctl(epfd: i32, op: i32, fd: i32, events: u32, token: u64) {
    let mut ev = libc::epoll_event { events, u64: token };
    // SAFETY: a valid epoll_event; errors (a closed fd) leave nothing to undo.
    unsafe { libc::epoll_ctl(epfd, op, fd, &mut ev) };
}

fn signal(fd: i32) {
    let one: u64 = 1;
    // SAFETY: writes 8 bytes from a live u64 to an eventfd.
    unsafe { libc::write(fd, (&one as *const u64).cast(), 8) };
}

fn drain(fd: i32) {
    let mut n: u64 = 0;
    // SAFETY: reads at most 8 bytes into a live u64 (a non-blocking eventfd).
    unsafe { libc::read(fd, (&mut n as *mut u64).cast(), 8) };
}

fn lock(shared: &Shared) -> MutexGuard<'_, Inner> {
    shared.inner.lock().unwrap_or_else(|e| e.into_inner())
}

const CLIENT_EVENTS: u32 = (libc::EPOLLRDHUP | libc::EPOLLHUP | libc::EPOLLERR) as u32;

impl Stream {
    /// Frame `body`'s complete events for the client. Err ends the stream.
    fn take(&mut self, body: &[u8]) -> Result<(), (End, &'static str)> {
        let mut events = Vec::new();
        self.scanner.feed(body, &mut events).map_err(|m| (End::NotEvents, m))?;
        if !events.is_empty() {
            if self.out_at == self.out.len() {
                self.out.clear();
                self.out_at = 0;
            }
            self.out.extend_from_slice(format!("{:x}\r\n", events.len()).as_bytes());
            self.out.extend_from_slice(&events);
            self.out.extend_from_slice(b"\r\n");
        }
        Ok(())
    }

    /// One read of the upstream socket.
    fn read_up(&mut self, buf: &mut [u8]) -> Result<(), (End, &'static str)> {
        // SAFETY: reads into a live buffer of buf.len() bytes.
        let n = unsafe { libc::read(self.up, buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            let e = errno();
            if e == libc::EAGAIN || e == libc::EINTR {
                return Ok(());
            }
            return Err((End::Broken, "upstream reply broken off"));
        }
        if n == 0 {
            return if self.decoder.framing == crate::sse::Framing::Eof {
                self.ending = Some((End::Ended, ""));
                Ok(())
            } else {
                Err((End::Broken, "upstream reply broken off"))
            };
        }
        self.last_read = Instant::now();
        let mut body = Vec::with_capacity(n as usize);
        self.decoder
            .feed(&buf[..n as usize], &mut body)
            .map_err(|_| (End::Broken, "malformed upstream reply"))?;
        self.take(&body)?;
        if self.decoder.ended() {
            self.ending = Some((End::Ended, ""));
        }
        Ok(())
    }

    /// Write what is pending; which events to watch next. Err: the client is gone.
    fn flush(&mut self, epfd: i32, id: u64) -> Result<(), (End, &'static str)> {
        while self.out_at < self.out.len() {
            let rest = &self.out[self.out_at..];
            // SAFETY: sends from a live buffer of rest.len() bytes.
            let n = unsafe {
                libc::send(self.client, rest.as_ptr().cast(), rest.len(),
                           libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT)
            };
            if n < 0 {
                let e = errno();
                if e == libc::EINTR {
                    continue;
                }
                if e == libc::EAGAIN {
                    break;
                }
                return Err((End::ClientLeft, "client left"));
            }
            self.out_at += n as usize;
        }
        let pending = self.out.len() - self.out_at;
        if pending == 0 {
            self.out.clear();
            self.out_at = 0;
        }
        let writing = pending > 0;
        if writing != self.writing {
            self.writing = writing;
            let events = CLIENT_EVENTS | if writing { libc::EPOLLOUT as u32 } else { 0 };
            ctl(epfd, libc::EPOLL_CTL_MOD, self.client, events, id * 2 + 1);
        }
        let reading = pending < HIGH_WATER && self.ending.is_none();
        if reading != self.reading {
            self.reading = reading;
            if reading {
                self.last_read = Instant::now(); // our client was slow, not the upstream
            }
            // Out of the epoll while not read: a hang-up is reported even with no events
            // asked for, and would wake the thread again and again.
            let op = if reading { libc::EPOLL_CTL_ADD } else { libc::EPOLL_CTL_DEL };
            ctl(epfd, op, self.up, libc::EPOLLIN as u32, id * 2);
        }
        Ok(())
    }
}

impl Inner {
    fn finish(&mut self, epfd: i32, id: u64, end: End, message: &'static str) {
        let Some(st) = self.streams.remove(&id) else { return };
        for fd in [st.up, st.client] {
            ctl(epfd, libc::EPOLL_CTL_DEL, fd, 0, 0);
            // SAFETY: our own duplicate, closed once (the stream is gone from the table).
            unsafe { libc::close(fd) };
        }
        let SseScanner { done, error, usage, collected, .. } = st.scanner;
        self.finished.push(Finished { id, end, done, error, usage, collected, message });
    }

    /// After an event on a stream: write what is pending, end it if it is over.
    fn settle(&mut self, epfd: i32, id: u64, result: Result<(), (End, &'static str)>) {
        let Some(st) = self.streams.get_mut(&id) else { return };
        let result = result.and_then(|()| st.flush(epfd, id));
        match result {
            Err((end, message)) => self.finish(epfd, id, end, message),
            Ok(()) => {
                if st.out_at == st.out.len() {
                    if let Some((end, message)) = st.ending {
                        self.finish(epfd, id, end, message);
                    }
                }
            }
        }
    }
}

fn dup(fd: i32) -> std::io::Result<i32> {
    // SAFETY: fcntl on a caller's fd; a bad one is an error, not UB.
    let new = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
    if new < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(new)
    }
}

impl Relay {
    pub fn new() -> std::io::Result<Relay> {
        // SAFETY: plain syscalls creating fds that Shared owns from here on.
        let (epfd, wake_fd, notify_fd) = unsafe {
            (libc::epoll_create1(libc::EPOLL_CLOEXEC),
             libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC),
             libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC))
        };
        if epfd < 0 || wake_fd < 0 || notify_fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        ctl(epfd, libc::EPOLL_CTL_ADD, wake_fd, libc::EPOLLIN as u32, WAKE);
        let shared = Arc::new(Shared {
            inner: Mutex::new(Inner { streams: HashMap::new(), finished: Vec::new(),
                                      next_id: 1, stop: false }),
            epfd, wake_fd, notify_fd,
        });
        let worker = shared.clone();
        let thread = std::thread::Builder::new()
            .name("tollway-relay".into())
            .spawn(move || run(&worker))?;
        Ok(Relay { shared, thread: Some(thread) })
    }

    /// The eventfd that becomes readable when streams have finished.
    pub fn notify_fd(&self) -> i32 {
        self.shared.notify_fd
    }

    /// Take over a stream; its id. `reply`: the bytes the client read since the reply
    /// began; `untaken`: how many of their body bytes the Python relay has not taken (the
    /// last ones); `pending`: the tap's incomplete event.
    #[allow(clippy::too_many_arguments)]
    pub fn start(&self, up: i32, client: i32, reply: &[u8], untaken: usize, pending: &[u8],
                 keep_usage: bool, silence_s: f64, total_s: f64) -> Result<u64, String> {
        let (decoder, body) = BodyDecoder::from_reply(reply).map_err(str::to_string)?;
        let consumed = body.len().checked_sub(untaken)
            .ok_or("the reply bytes do not hold the body not taken")?;
        let up = dup(up).map_err(|e| e.to_string())?;
        let client = match dup(client) {
            Ok(fd) => fd,
            Err(e) => {
                // SAFETY: our own duplicate, not shared yet.
                unsafe { libc::close(up) };
                return Err(e.to_string());
            }
        };
        let now = Instant::now();
        let mut st = Stream {
            up, client, decoder, scanner: SseScanner::new(keep_usage, pending),
            out: Vec::new(), out_at: 0, reading: true, writing: false, ending: None,
            last_read: now, silence: Duration::from_secs_f64(silence_s.max(0.001)),
            total_at: now + Duration::from_secs_f64(total_s.clamp(0.001, 1e9)),
        };
        let epfd = self.shared.epfd;
        let mut inner = lock(&self.shared);
        let id = inner.next_id;
        inner.next_id += 1;
        ctl(epfd, libc::EPOLL_CTL_ADD, up, libc::EPOLLIN as u32, id * 2);
        ctl(epfd, libc::EPOLL_CTL_ADD, client, CLIENT_EVENTS, id * 2 + 1);
        let mut result = st.take(&body[consumed..]);
        if result.is_ok() && st.decoder.ended() {
            st.ending = Some((End::Ended, ""));
        }
        if let Err(e) = result {
            st.ending = Some(e);
            result = Ok(());
        }
        inner.streams.insert(id, st);
        let before = inner.finished.len();
        inner.settle(epfd, id, result);
        if inner.finished.len() > before {
            signal(self.shared.notify_fd);
        }
        Ok(id)
    }

    /// Stop relaying a stream; whether it was still running. Once this returns the relay
    /// uses neither of its sockets again, and no outcome comes for it.
    pub fn cancel(&self, id: u64) -> bool {
        let mut inner = lock(&self.shared);
        let running = inner.streams.contains_key(&id);
        inner.finish(self.shared.epfd, id, End::ClientLeft, "");
        if running {
            inner.finished.pop();
        }
        running
    }

    /// The streams that ended since the last call.
    pub fn finished(&self) -> Vec<Finished> {
        drain(self.shared.notify_fd);
        std::mem::take(&mut lock(&self.shared).finished)
    }

    pub fn running(&self) -> usize {
        lock(&self.shared).streams.len()
    }
}

impl Relay {
    /// Stop the thread and end every stream still relayed (as if its client left); what
    /// ended and was not taken yet, those included.
    pub fn shutdown(&mut self) -> Vec<Finished> {
        let Some(thread) = self.thread.take() else { return Vec::new() };
        lock(&self.shared).stop = true;
        signal(self.shared.wake_fd);
        let _ = thread.join();
        let mut inner = lock(&self.shared);
        let ids: Vec<u64> = inner.streams.keys().copied().collect();
        for id in ids {
            inner.finish(self.shared.epfd, id, End::ClientLeft, "the gateway stopped");
        }
        std::mem::take(&mut inner.finished)
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.shutdown();
        // SAFETY: the thread is gone; these fds are ours alone.
        unsafe {
            libc::close(self.shared.epfd);
            libc::close(self.shared.wake_fd);
            libc::close(self.shared.notify_fd);
        }
    }
}

fn run(shared: &Shared) {
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 256];
    let mut buf = vec![0u8; READ_BYTES];
    let mut checked = Instant::now();
    loop {
        // SAFETY: `events` has room for its length.
        let n = unsafe { libc::epoll_wait(shared.epfd, events.as_mut_ptr(), events.len() as i32, 500) };
        let mut inner = lock(shared);
        if inner.stop {
            return;
        }
        let before = inner.finished.len();
        for ev in &events[..n.max(0) as usize] {
            let token = ev.u64;
            let flags = ev.events;
            if token == WAKE {
                drain(shared.wake_fd);
                continue;
            }
            let id = token / 2;
            let Some(st) = inner.streams.get_mut(&id) else { continue };
            let result = if token % 2 == 0 {
                if st.reading { st.read_up(&mut buf) } else { Ok(()) }
            } else if flags & (libc::EPOLLRDHUP | libc::EPOLLHUP | libc::EPOLLERR) as u32 != 0 {
                Err((End::ClientLeft, "client left"))
            } else {
                Ok(())
            };
            inner.settle(shared.epfd, id, result);
        }
        let now = Instant::now();
        if now.duration_since(checked) >= Duration::from_millis(250) {
            checked = now;
            let late: Vec<u64> = inner
                .streams
                .iter()
                .filter(|(_, st)| {
                    now >= st.total_at || (st.reading && now.duration_since(st.last_read) >= st.silence)
                })
                .map(|(&id, _)| id)
                .collect();
            for id in late {
                inner.finish(shared.epfd, id, End::TimedOut, "upstream timed out");
            }
        }
        if inner.finished.len() > before {
            signal(shared.notify_fd);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixStream;

    fn pair() -> (UnixStream, UnixStream) {
        let (a, b) = UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        (a, b)
    }

    fn wait(relay: &Relay) -> Finished {
        for _ in 0..500 {
            let mut done = relay.finished();
            if let Some(f) = done.pop() {
                return f;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("no outcome");
    }

    #[test]
    fn relays_a_chunked_stream_to_its_end() {
        let relay = Relay::new().unwrap();
        let (up_ours, mut up_theirs) = pair();
        let (client_ours, mut client_theirs) = pair();
        let head = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n7\r\ndata: a\r\n";
        let id = relay
            .start(up_ours.as_raw_fd(), client_ours.as_raw_fd(), head, 0, b"data: a", true, 5.0, 60.0)
            .unwrap();
        drop(up_ours);
        drop(client_ours);
        up_theirs.write_all(b"2\r\n\n\n\r\n9\r\ndata: b\n\n\r\ne\r\ndata: [DONE]\n\n\r\n0\r\n\r\n").unwrap();
        let f = wait(&relay);
        assert_eq!((f.id, f.end, f.done, f.error), (id, End::Ended, true, false));
        let mut got = Vec::new();
        client_theirs.read_to_end(&mut got).unwrap();
        assert_eq!(got, b"12\r\ndata: a\n\ndata: b\n\n\r\n");
        assert_eq!(f.collected, b"data: a\n\ndata: b\n\n");
        assert_eq!(relay.running(), 0);
    }

    #[test]
    fn client_leaving_and_upstream_breaking_end_the_stream() {
        let relay = Relay::new().unwrap();
        let head = b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\n";
        let (up_ours, _up_theirs) = pair();
        let (client_ours, client_theirs) = pair();
        relay.start(up_ours.as_raw_fd(), client_ours.as_raw_fd(), head, 0, b"", true, 5.0, 60.0).unwrap();
        drop(client_theirs);
        assert_eq!(wait(&relay).end, End::ClientLeft);
        let (up_ours, mut up_theirs) = pair();
        let (client_ours, _client_theirs) = pair();
        relay.start(up_ours.as_raw_fd(), client_ours.as_raw_fd(), head, 0, b"", true, 5.0, 60.0).unwrap();
        up_theirs.write_all(b"data: x\n\n").unwrap();
        drop(up_theirs);
        let f = wait(&relay);
        assert_eq!((f.end, f.done), (End::Broken, false));
        assert_eq!(f.collected, b"data: x\n\n");
    }

    #[test]
    fn a_slow_client_gets_everything_and_the_end_waits_for_it() {
        let relay = Relay::new().unwrap();
        let head = b"HTTP/1.1 200 OK\r\n\r\n"; // the body ends at EOF
        let (up_ours, mut up_theirs) = pair();
        let (client_ours, mut client_theirs) = pair();
        relay.start(up_ours.as_raw_fd(), client_ours.as_raw_fd(), head, 0, b"", true, 5.0, 60.0).unwrap();
        drop(up_ours);
        drop(client_ours);
        let event = b"data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}]}\n\n";
        let writer = std::thread::spawn(move || {
            for _ in 0..40_000 {
                up_theirs.write_all(event).unwrap(); // ~1.9 MB, past HIGH_WATER
            }
        });
        std::thread::sleep(Duration::from_millis(100)); // the client reads nothing yet
        assert!(relay.finished().is_empty());
        let mut got = Vec::new();
        client_theirs.read_to_end(&mut got).unwrap(); // EOF: the relay closed its copy
        writer.join().unwrap();
        let f = wait(&relay);
        assert_eq!(f.end, End::Ended);
        // Unframe the HTTP chunks: the events, whole and in order.
        let mut body = Vec::new();
        let mut d = BodyDecoder::new(crate::sse::Framing::Chunked, 0);
        d.feed(&got, &mut body).unwrap();
        assert_eq!(body.len(), event.len() * 40_000);
        assert!(body.chunks(event.len()).all(|e| e == event));
        assert_eq!(f.collected, body);
    }

    #[test]
    fn cancel_and_silence() {
        let relay = Relay::new().unwrap();
        let head = b"HTTP/1.1 200 OK\r\n\r\n";
        let (up_ours, _up_theirs) = pair();
        let (client_ours, _client_theirs) = pair();
        let id = relay.start(up_ours.as_raw_fd(), client_ours.as_raw_fd(), head, 0, b"", true, 5.0, 60.0).unwrap();
        assert!(relay.cancel(id));
        assert!(!relay.cancel(id));
        assert!(relay.finished().is_empty());
        relay.start(up_ours.as_raw_fd(), client_ours.as_raw_fd(), head, 0, b"", true, 0.05, 60.0).unwrap();
        assert_eq!(wait(&relay).end, End::TimedOut);
        let mut relay = relay;
        relay.start(up_ours.as_raw_fd(), client_ours.as_raw_fd(), head, 0, b"data: x\n\n", true, 5.0, 60.0).unwrap();
        let ended = relay.shutdown();
        assert_eq!(ended.len(), 1);
        assert_eq!((ended[0].end, &ended[0].collected[..]), (End::ClientLeft, &b"data: x\n\n"[..]));
    }
}
