//! The byte work of the native stream relay (see `relay.rs`), in plain safe Rust:
//!
//! - [`BodyDecoder`]: an HTTP/1.1 response body's framing (chunked, a length, or up to
//!   EOF), resumable at any byte, set up from the raw bytes the Python client received
//!   since the reply began (its parser's chunk state is not readable from Python).
//! - [`SseScanner`]: what `pipeline/stream.py`'s `SseTap.feed` does once the first token
//!   has been seen and no output limit applies, byte for byte: complete events pass
//!   through as the provider sent them (CRLF line ends made LF), `data: [DONE]` is held
//!   back, an `"error"` event is noted, the usage chunk's payload is kept (and dropped
//!   when the caller did not ask for usage and it carries no choices).

/// Bytes held for one event whose end has not come (as `stream.MAX_EVENT_BYTES`).
pub const MAX_EVENT_BYTES: usize = 1 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    Size,
    Data,
    DataEnd,
    Trailers,
    Done,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    Chunked,
    Length,
    Eof,
}

/// An HTTP/1.1 body's framing, fed the bytes read from the socket.
#[derive(Debug)]
pub struct BodyDecoder {
    pub framing: Framing,
    state: Chunk,
    remaining: u64,
    line: Vec<u8>,
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    memchr::memmem::find(hay, needle)
}

fn rfind(hay: &[u8], needle: &[u8]) -> Option<usize> {
    memchr::memmem::rfind(hay, needle)
}

struct Needles {
    done: memchr::memmem::Finder<'static>,
    error: memchr::memmem::Finder<'static>,
    usage: memchr::memmem::Finder<'static>,
}

fn needles() -> &'static Needles {
    static NEEDLES: std::sync::OnceLock<Needles> = std::sync::OnceLock::new();
    NEEDLES.get_or_init(|| Needles {
        done: memchr::memmem::Finder::new(b"[DONE]"),
        error: memchr::memmem::Finder::new(b"\"error\""),
        usage: memchr::memmem::Finder::new(b"\"usage\""),
    })
}

/// Where the complete events of `block` stop being plain, able to go out whole, unread:
/// the start of the first event holding `[DONE]`, `"error"` or a `"usage"` that is not
/// null; `block.len()` when none does; 0 when that start is inside a run of blank lines.
/// A false alarm (the words inside a JSON string are escaped, so it takes odd JSON) only
/// costs reading the run event by event.
pub fn plain_end(block: &[u8]) -> usize {
    let n = needles();
    let mut cut = block.len();
    for finder in [&n.done, &n.error] {
        if let Some(at) = finder.find(&block[..cut]) {
            cut = at;
        }
    }
    for at in n.usage.find_iter(&block[..cut]) {
        let after = &block[at + 7..];
        if !(after.starts_with(b":null") || after.starts_with(b": null")) {
            cut = at;
            break;
        }
    }
    if cut == block.len() {
        return cut;
    }
    match rfind(&block[..cut], b"\n\n") {
        Some(start) if start > 0 && block[start - 1] != b'\n' => start + 2,
        _ => 0,
    }
}

impl BodyDecoder {
    pub fn new(framing: Framing, length: u64) -> Self {
        BodyDecoder { framing, state: Chunk::Size, remaining: length, line: Vec::new() }
    }

    /// The decoder for a reply from its first byte (`raw`: status line, headers, body so
    /// far; interim 1xx replies are skipped), and the body bytes in `raw`.
    pub fn from_reply(raw: &[u8]) -> Result<(Self, Vec<u8>), &'static str> {
        let mut at = 0;
        loop {
            let head_len = find(&raw[at..], b"\r\n\r\n").ok_or("incomplete head")?;
            let head = &raw[at..at + head_len];
            at += head_len + 4;
            let mut lines = head.split(|&b| b == b'\n');
            let status_line = lines.next().ok_or("no status line")?;
            let status: u16 = std::str::from_utf8(status_line.get(9..12).ok_or("bad status")?)
                .ok()
                .and_then(|s| s.parse().ok())
                .ok_or("bad status")?;
            if (100..200).contains(&status) {
                continue;
            }
            let mut framing = Framing::Eof;
            let mut length = 0u64;
            for line in lines {
                let line = line.strip_suffix(b"\r").unwrap_or(line);
                let Some(colon) = line.iter().position(|&b| b == b':') else { continue };
                let name = line[..colon].to_ascii_lowercase();
                let value = line[colon + 1..].trim_ascii().to_ascii_lowercase();
                if name == b"transfer-encoding" {
                    if find(&value, b"chunked").is_some() {
                        framing = Framing::Chunked;
                    } else {
                        return Err("unsupported transfer-encoding");
                    }
                } else if name == b"content-length" && framing != Framing::Chunked {
                    length = std::str::from_utf8(&value)
                        .ok()
                        .and_then(|s| s.parse().ok())
                        .ok_or("bad content-length")?;
                    framing = Framing::Length;
                }
            }
            let mut decoder = BodyDecoder::new(framing, length);
            let mut body = Vec::new();
            decoder.feed(&raw[at..], &mut body)?;
            return Ok((decoder, body));
        }
    }

    /// Whether the body is complete.
    pub fn ended(&self) -> bool {
        match self.framing {
            Framing::Chunked => self.state == Chunk::Done,
            Framing::Length => self.remaining == 0,
            Framing::Eof => false,
        }
    }

    /// The body bytes in `input`, appended to `out`. Bytes after the body's end are an
    /// error (a second reply to one request).
    pub fn feed(&mut self, mut input: &[u8], out: &mut Vec<u8>) -> Result<(), &'static str> {
        match self.framing {
            Framing::Eof => {
                out.extend_from_slice(input);
                return Ok(());
            }
            Framing::Length => {
                if input.len() as u64 > self.remaining {
                    return Err("bytes after the body");
                }
                self.remaining -= input.len() as u64;
                out.extend_from_slice(input);
                return Ok(());
            }
            Framing::Chunked => {}
        }
        while !input.is_empty() {
            match self.state {
                Chunk::Size | Chunk::Trailers | Chunk::DataEnd => {
                    let nl = input.iter().position(|&b| b == b'\n');
                    let take = nl.map_or(input.len(), |p| p + 1);
                    if self.line.len() + take > 4096 {
                        return Err("chunk line too long");
                    }
                    self.line.extend_from_slice(&input[..take]);
                    input = &input[take..];
                    if nl.is_none() {
                        return Ok(());
                    }
                    let line = std::mem::take(&mut self.line);
                    let text = line.strip_suffix(b"\n").unwrap_or(&line);
                    let text = text.strip_suffix(b"\r").unwrap_or(text);
                    match self.state {
                        Chunk::DataEnd => {
                            if !text.is_empty() {
                                return Err("chunk not ended by CRLF");
                            }
                            self.state = Chunk::Size;
                        }
                        Chunk::Trailers => {
                            if text.is_empty() {
                                self.state = Chunk::Done;
                            }
                        }
                        _ => {
                            let hex = text.split(|&b| b == b';').next().unwrap_or(b"").trim_ascii();
                            if hex.is_empty() || hex.len() > 15 {
                                return Err("bad chunk size");
                            }
                            let mut size = 0u64;
                            for &b in hex {
                                let digit = (b as char).to_digit(16).ok_or("bad chunk size")?;
                                size = size * 16 + digit as u64;
                            }
                            if size == 0 {
                                self.state = Chunk::Trailers;
                            } else {
                                self.remaining = size;
                                self.state = Chunk::Data;
                            }
                        }
                    }
                }
                Chunk::Data => {
                    let n = (self.remaining.min(input.len() as u64)) as usize;
                    out.extend_from_slice(&input[..n]);
                    input = &input[n..];
                    self.remaining -= n as u64;
                    if self.remaining == 0 {
                        self.state = Chunk::DataEnd;
                    }
                }
                Chunk::Done => return Err("bytes after the body"),
            }
        }
        Ok(())
    }
}

/// The value of a top-level member of the JSON object `json`: its first byte, or None
/// when the member is absent or `json` is not an object.
fn member<'a>(json: &'a [u8], name: &[u8]) -> Option<&'a [u8]> {
    let mut i = skip_ws(json, 0);
    if json.get(i) != Some(&b'{') {
        return None;
    }
    i += 1;
    loop {
        i = skip_ws(json, i);
        match json.get(i)? {
            b'}' => return None,
            b'"' => {}
            _ => return None,
        }
        let key_end = skip_string(json, i)?;
        let key = &json[i + 1..key_end - 1];
        i = skip_ws(json, key_end);
        if json.get(i) != Some(&b':') {
            return None;
        }
        i = skip_ws(json, i + 1);
        let value_end = skip_value(json, i)?;
        if key == name {
            return Some(&json[i..value_end]);
        }
        i = skip_ws(json, value_end);
        match json.get(i)? {
            b',' => i += 1,
            _ => return None,
        }
    }
}

fn skip_ws(json: &[u8], mut i: usize) -> usize {
    while matches!(json.get(i), Some(b' ' | b'\t' | b'\n' | b'\r')) {
        i += 1;
    }
    i
}

/// `json[i]` is a quote: the index after the closing one.
fn skip_string(json: &[u8], mut i: usize) -> Option<usize> {
    i += 1;
    loop {
        match json.get(i)? {
            b'"' => return Some(i + 1),
            b'\\' => i += 2,
            _ => i += 1,
        }
    }
}

fn skip_value(json: &[u8], i: usize) -> Option<usize> {
    match json.get(i)? {
        b'"' => skip_string(json, i),
        b'{' | b'[' => {
            let mut depth = 0usize;
            let mut j = i;
            loop {
                match json.get(j)? {
                    b'"' => {
                        j = skip_string(json, j)?;
                        continue;
                    }
                    b'{' | b'[' => depth += 1,
                    b'}' | b']' => {
                        depth -= 1;
                        if depth == 0 {
                            return Some(j + 1);
                        }
                    }
                    _ => {}
                }
                j += 1;
            }
        }
        _ => {
            let mut j = i;
            while let Some(&b) = json.get(j) {
                if matches!(b, b',' | b'}' | b']' | b' ' | b'\t' | b'\n' | b'\r') {
                    break;
                }
                j += 1;
            }
            (j > i).then_some(j)
        }
    }
}

/// The data of one event: its `data:` lines joined by newlines (as `stream._payload`).
fn payload(event: &[u8]) -> std::borrow::Cow<'_, [u8]> {
    if let Some(rest) = event.strip_prefix(b"data: ") {
        if memchr::memchr(b'\n', rest).is_none() {
            return std::borrow::Cow::Borrowed(rest);
        }
    }
    let mut out: Vec<u8> = Vec::new();
    for line in event.split(|&b| b == b'\n') {
        if let Some(piece) = line.strip_prefix(b"data:") {
            let piece = piece.strip_prefix(b" ").unwrap_or(piece);
            // As `payload + b"\n" + piece if payload else piece`.
            if !out.is_empty() {
                out.push(b'\n');
            }
            out.extend_from_slice(piece);
        }
    }
    std::borrow::Cow::Owned(out)
}

/// The tap's work on a stream past its first token, with no output limit.
#[derive(Debug, Default)]
pub struct SseScanner {
    buf: Vec<u8>,
    pub keep_usage: bool,
    pub done: bool,
    pub error: bool,
    /// The payload of the last chunk with a usage.
    pub usage: Option<Vec<u8>>,
    /// Every event forwarded, for the text when no usage comes.
    pub collected: Vec<u8>,
}

impl SseScanner {
    /// `pending`: the tap's bytes of an event not complete yet (LF line ends already).
    pub fn new(keep_usage: bool, pending: &[u8]) -> Self {
        SseScanner { buf: pending.to_vec(), keep_usage, ..Default::default() }
    }

    /// The complete events in what was buffered plus `data`, ready to forward, appended
    /// to `out`. Err: no event end within [`MAX_EVENT_BYTES`].
    pub fn feed(&mut self, data: &[u8], out: &mut Vec<u8>) -> Result<(), &'static str> {
        self.buf.extend_from_slice(data);
        if self.buf.contains(&b'\r') {
            let mut fixed = Vec::with_capacity(self.buf.len());
            let mut i = 0;
            let b = &self.buf;
            while i < b.len() {
                if b[i] == b'\r' && b.get(i + 1) == Some(&b'\n') {
                    fixed.push(b'\n');
                    i += 2;
                } else {
                    fixed.push(b[i]);
                    i += 1;
                }
            }
            self.buf = fixed;
        }
        let Some(last) = rfind(&self.buf, b"\n\n") else {
            return self.check();
        };
        // Events end at blank lines taken two newlines at a time from the start of a run.
        let mut start = last;
        while start > 0 && self.buf[start - 1] == b'\n' {
            start -= 1;
        }
        let end = start + (last + 2 - start) / 2 * 2;
        let rest = self.buf.split_off(end);
        let complete = std::mem::replace(&mut self.buf, rest);
        self.check()?;
        let before = out.len();
        if plain_end(&complete) == complete.len() {
            out.extend_from_slice(&complete);
        } else {
            let mut events: Vec<&[u8]> = Vec::new();
            let mut at = 0;
            while let Some(p) = find(&complete[at..], b"\n\n") {
                events.push(&complete[at..at + p]);
                at += p + 2;
            }
            for event in events {
                if self.inspect(event) {
                    out.extend_from_slice(event);
                    out.extend_from_slice(b"\n\n");
                }
            }
        }
        self.collected.extend_from_slice(&out[before..]);
        Ok(())
    }

    fn check(&self) -> Result<(), &'static str> {
        if self.buf.len() > MAX_EVENT_BYTES {
            Err("not an event stream")
        } else {
            Ok(())
        }
    }

    /// Read one event (as `SseTap._inspect`); false to drop it.
    fn inspect(&mut self, event: &[u8]) -> bool {
        let data = payload(event);
        if data.is_empty() {
            return true;
        }
        if *data == *b"[DONE]" {
            self.done = true;
            return false;
        }
        if member(&data, b"error").is_some_and(|v| v[0] == b'{') {
            self.error = true;
        }
        if member(&data, b"usage").is_some_and(|v| v[0] == b'{') {
            let choices = member(&data, b"choices");
            let no_choices = match choices {
                None => true,
                Some(v) => v == b"null" || v[0] == b'[' && skip_ws(v, 1) == v.len() - 1,
            };
            self.usage = Some(data.into_owned());
            if !self.keep_usage && no_choices {
                return false;
            }
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_all(raw: &[u8], step: usize) -> (Vec<u8>, bool) {
        let at = find(raw, b" 200 OK").unwrap();
        let split = at + find(&raw[at..], b"\r\n\r\n").unwrap() + 4;
        let (mut d, mut body) = BodyDecoder::from_reply(&raw[..split]).unwrap();
        for piece in raw[split..].chunks(step) {
            d.feed(piece, &mut body).unwrap();
        }
        (body, d.ended())
    }

    #[test]
    fn chunked_body_in_any_pieces() {
        let raw: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5;x=y\r\nhello\r\n1A\r\nabcdefghijklmnopqrstuvwxyz\r\n0\r\nTrailer: t\r\n\r\n";
        for step in 1..12 {
            let (body, ended) = decode_all(raw, step);
            assert_eq!(body, b"helloabcdefghijklmnopqrstuvwxyz");
            assert!(ended);
        }
        let (body, ended) = decode_all(&raw[..raw.len() - 2], 3);
        assert_eq!(body.len(), 31);
        assert!(!ended);
    }

    #[test]
    fn length_and_eof_bodies() {
        let (body, ended) = decode_all(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nabcd", 1);
        assert_eq!((body.as_slice(), ended), (&b"abcd"[..], true));
        let (body, ended) = decode_all(b"HTTP/1.0 200 OK\r\nX: y\r\n\r\nabcd", 2);
        assert_eq!((body.as_slice(), ended), (&b"abcd"[..], false));
    }

    #[test]
    fn bad_framing_is_an_error() {
        let mut d = BodyDecoder::new(Framing::Chunked, 0);
        let mut out = Vec::new();
        assert!(d.feed(b"zz\r\n", &mut out).is_err());
        let mut d = BodyDecoder::new(Framing::Chunked, 0);
        assert!(d.feed(b"2\r\nabX\r\n", &mut out).is_err());
        let mut d = BodyDecoder::new(Framing::Chunked, 0);
        assert!(d.feed(b"0\r\n\r\nmore", &mut out).is_err());
        assert!(BodyDecoder::from_reply(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n").is_err());
    }

    fn scan(keep_usage: bool, pieces: &[&[u8]]) -> (Vec<u8>, SseScanner) {
        let mut s = SseScanner::new(keep_usage, b"");
        let mut out = Vec::new();
        for p in pieces {
            s.feed(p, &mut out).unwrap();
        }
        (out, s)
    }

    const CHUNK: &[u8] = b"data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}],\"usage\":null}\n\n";
    const USAGE: &[u8] = b"data: {\"choices\":[],\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":2,\"total_tokens\":3}}\n\n";

    #[test]
    fn events_pass_whole_and_done_is_held_back() {
        let mut all = Vec::new();
        all.extend_from_slice(b": t=1\n\n");
        all.extend_from_slice(CHUNK);
        all.extend_from_slice(CHUNK);
        all.extend_from_slice(USAGE);
        all.extend_from_slice(b"data: [DONE]\n\n");
        for step in [1, 2, 7, 50, all.len()] {
            let pieces: Vec<&[u8]> = all.chunks(step).collect();
            let (out, s) = scan(true, &pieces);
            assert_eq!(out, &all[..all.len() - 14]);
            assert!(s.done && !s.error);
            assert_eq!(s.usage.as_deref(), Some(&USAGE[6..USAGE.len() - 2]));
            assert_eq!(s.collected, out);
            let (out, s) = scan(false, &pieces);
            assert_eq!(out.len(), all.len() - 14 - USAGE.len());
            assert!(s.usage.is_some());
        }
    }

    #[test]
    fn crlf_split_across_reads_and_odd_blank_runs() {
        let (out, _) = scan(true, &[b"data: {\"a\":1}\r", b"\n\r\n", b"data: x\n\n\n"]);
        assert_eq!(out, b"data: {\"a\":1}\n\ndata: x\n\n");
        let (out, s) = scan(true, &[b"data: x\n\n\n", b"\ndata: y\n\n"]);
        assert_eq!(out, b"data: x\n\n\n\ndata: y\n\n");
        assert!(s.buf.is_empty());
    }

    #[test]
    fn error_event_and_usage_in_strings() {
        let event = b"data: {\"error\":{\"message\":\"boom\"}}\n\n";
        let (out, s) = scan(true, &[event]);
        assert!(s.error);
        assert_eq!(out, event);
        let text = b"data: {\"choices\":[{\"delta\":{\"content\":\"\\\"usage\\\": [DONE] \\\"error\\\"\"}}]}\n\n";
        let (out, s) = scan(false, &[text]);
        assert_eq!(out, text);
        assert!(!s.error && !s.done && s.usage.is_none());
    }

    #[test]
    fn plain_end_is_where_the_tail_starts() {
        let head = b"data: {\"usage\":null}\n\ndata: {\"usage\": null}\n\n";
        let mut block = head.to_vec();
        assert_eq!(plain_end(&block), block.len());
        block.extend_from_slice(USAGE);
        block.extend_from_slice(b"data: [DONE]\n\n");
        assert_eq!(plain_end(&block), head.len());
        assert_eq!(plain_end(b"data: [DONE]\n\n"), 0);
        assert_eq!(plain_end(b"data: x\n\n\n\ndata: {\"error\":1}\n\n"), 0);
        assert_eq!(plain_end(b"data: x\n\ndata: {\"error\":1}\n\n"), 9);
    }

    #[test]
    fn multi_line_payloads() {
        assert_eq!(&*payload(b"event: x\ndata: a\ndata:b\nid: 1"), b"a\nb");
        assert_eq!(member(b" {\"a\" : [1,{\"b\":\"}\"}], \"usage\" :null}", b"usage"), Some(&b"null"[..]));
        assert_eq!(member(b"[1]", b"usage"), None);
    }

    #[test]
    fn no_event_end_is_refused() {
        let mut s = SseScanner::new(true, b"");
        let mut out = Vec::new();
        let big = vec![b'x'; MAX_EVENT_BYTES + 1];
        assert!(s.feed(&big, &mut out).is_err());
    }
}
