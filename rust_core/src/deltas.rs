//! Text deltas of a chat completions stream, rewritten as another API's events in one
//! pass over the provider's bytes.
//!
//! A stream translated to Anthropic's Messages or OpenAI's Responses events is, past its
//! first token, almost all text deltas: chat chunks whose only news is a piece of text.
//! Each becomes one event of the other API that carries the same piece, and the piece's
//! JSON string can be copied from the provider's bytes as it is (any JSON string is valid
//! JSON wherever a string goes). [`text_deltas`] does that for a run of complete events,
//! and answers `None` for any run it would read differently from the Python translators
//! (`pipeline/translate.py`, `pipeline/responses.py`), which then read it themselves:
//! a tool call, a refusal, an error or usage, an event that is not one `data:` line, a
//! payload that is not valid JSON or whose fields do not have the types the Python
//! decoder (`stream._Chunk`) asks for, a member named twice.

/// What a run of text deltas came to.
#[derive(Debug, Default, PartialEq)]
pub struct Deltas {
    /// One event per non-empty text piece: `head`, the sequence number (when counted),
    /// `middle`, the piece's JSON string, `tail`.
    pub out: Vec<u8>,
    /// The pieces, their escapes decoded, joined.
    pub text: String,
    /// The first and the last finish reason that is not null or empty.
    pub first_finish: Option<String>,
    pub last_finish: Option<String>,
    /// Events written.
    pub count: u64,
}

/// The pieces of the output events: see [`Deltas::out`].
pub struct Template<'a> {
    pub head: &'a [u8],
    pub middle: &'a [u8],
    pub tail: &'a [u8],
    /// The first event's sequence number; None: no number is written.
    pub seq: Option<u64>,
}

/// The events for `run` (complete events, LF line ends, each ending in a blank line), or
/// None when it is not text deltas alone in the shape described above.
pub fn text_deltas(run: &[u8], template: &Template<'_>) -> Option<Deltas> {
    std::str::from_utf8(run).ok()?; // the Python decoder refuses what is not UTF-8
    let mut body = run.strip_suffix(b"\n\n")?;
    let mut got = Deltas::default();
    let finder = memchr::memmem::Finder::new(b"\n\n");
    // The bytes around the text of the last chunk read whole, when it was one text piece
    // and nothing else of note: a provider's chunks differ in their text alone, so a
    // chunk with the same bytes around a valid JSON string reads the same way, and only
    // its string need be read.
    let mut frame: Option<(&[u8], &[u8])> = None;
    loop {
        let (event, rest) = match finder.find(body) {
            Some(at) => (&body[..at], Some(&body[at + 2..])),
            None => (body, None),
        };
        let data = event.strip_prefix(b"data:")?;
        let data = data.strip_prefix(b" ").unwrap_or(data);
        if frame.is_none_or(|f| framed(data, f, template, &mut got).is_none()) {
            if memchr::memchr(b'\n', data).is_some() {
                return None;
            }
            let mut scan = Scan::default();
            chunk(data, template, &mut got, &mut scan)?;
            frame = (scan.pieces == 1 && !scan.finish)
                .then(|| (&data[..scan.piece.0], &data[scan.piece.1..]));
        }
        match rest {
            Some(rest) => body = rest,
            None => return Some(got),
        }
    }
}

/// What reading one chunk whole noted for the next one's frame.
#[derive(Default)]
struct Scan {
    /// Text values (strings, empty or not) met, and where the last one is (its quotes
    /// included).
    pieces: u32,
    piece: (usize, usize),
    /// A finish reason other than null was met.
    finish: bool,
}

/// `data`, when it is the frame's bytes around one JSON string: its piece written.
/// None (nothing written): read it whole.
fn framed(data: &[u8], (head, tail): (&[u8], &[u8]), template: &Template<'_>,
          got: &mut Deltas) -> Option<()> {
    (data.len() > head.len() + tail.len() + 1 && data.starts_with(head)
        && data.ends_with(tail) && data[head.len()] == b'"').then_some(())?;
    let end = string(data, head.len())?;
    (end == data.len() - tail.len()).then_some(())?;
    piece(&data[head.len()..end], template, got)
}

/// One text piece (a valid JSON string, its quotes included): written when not empty.
fn piece(raw: &[u8], template: &Template<'_>, got: &mut Deltas) -> Option<()> {
    if raw.len() > 2 {
        let text = String::from_utf8(unescape(&raw[1..raw.len() - 1])?).ok()?;
        got.text.push_str(&text);
        got.out.extend_from_slice(template.head);
        if let Some(seq) = template.seq {
            decimal(seq + got.count, &mut got.out);
        }
        got.out.extend_from_slice(template.middle);
        got.out.extend_from_slice(raw);
        got.out.extend_from_slice(template.tail);
        got.count += 1;
    }
    Some(())
}

/// One chunk's payload: a JSON object whose `choices` hold text deltas at most. Read in
/// one pass that also checks it is valid JSON: what it writes before a fault is thrown
/// away with the whole run.
fn chunk(json: &[u8], template: &Template<'_>, got: &mut Deltas, scan: &mut Scan) -> Option<()> {
    let mut seen = Names::default();
    let end = object(json, skip_ws(json, 0), 0, |name, at| match name {
        b"choices" => {
            seen.once(0)?;
            if json[at..].starts_with(b"null") {
                return Some(at + 4);
            }
            array(json, at, 1, |at| choice(json, at, template, got, scan))
        }
        b"id" => {
            seen.once(1)?;
            (json[at] == b'"').then_some(())?;
            string(json, at)
        }
        // Only ever null in a run of text deltas (nothing else is plain).
        b"usage" | b"error" => {
            seen.once(if name == b"usage" { 2 } else { 3 })?;
            json[at..].starts_with(b"null").then_some(at + 4)
        }
        _ => value(json, at, 1),
    })?;
    (skip_ws(json, end) == json.len()).then_some(())
}

/// One choice (at `json[at]`, two deep): its finish reason noted, its text written.
fn choice(json: &[u8], at: usize, template: &Template<'_>, got: &mut Deltas, scan: &mut Scan)
          -> Option<usize> {
    let mut seen = Names::default();
    object(json, at, 2, |name, at| match name {
        b"index" => {
            seen.once(0)?;
            integer(json, at)
        }
        b"delta" => {
            seen.once(1)?;
            if json[at..].starts_with(b"null") {
                return Some(at + 4);
            }
            delta(json, at, template, got, scan)
        }
        b"finish_reason" => {
            seen.once(2)?;
            let end = string_or_null(json, at)?;
            // Noted where it stands, not before the text as the Python translators
            // do: neither writes it until the stream ends.
            if end - at > 2 && json[at] == b'"' {
                scan.finish = true;
                let reason = String::from_utf8(unescape(&json[at + 1..end - 1])?).ok()?;
                if got.first_finish.is_none() {
                    got.first_finish = Some(reason.clone());
                }
                got.last_finish = Some(reason);
            }
            Some(end)
        }
        _ => value(json, at, 3),
    })
}

/// A choice's delta (at `json[at]`, three deep): its text written.
fn delta(json: &[u8], at: usize, template: &Template<'_>, got: &mut Deltas, scan: &mut Scan)
         -> Option<usize> {
    let mut seen = Names::default();
    object(json, at, 3, |name, at| match name {
        b"content" => {
            seen.once(0)?;
            let end = string_or_null(json, at)?;
            if json[at] == b'"' {
                scan.pieces += 1;
                scan.piece = (at, end);
                piece(&json[at..end], template, got)?;
            }
            Some(end)
        }
        // Read by the Python translators (or counted as output): theirs to do.
        b"refusal" | b"tool_calls" => {
            seen.once(if name == b"refusal" { 1 } else { 2 })?;
            json[at..].starts_with(b"null").then_some(at + 4)
        }
        _ => value(json, at, 4),
    })
}

fn decimal(mut n: u64, out: &mut Vec<u8>) {
    let mut digits = [0u8; 20];
    let mut k = digits.len();
    loop {
        k -= 1;
        digits[k] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[k..]);
}

/// Member names met in one object, to refuse one named twice (the Python decoder keeps
/// the last, a plain scan the first).
#[derive(Default)]
struct Names(u8);

impl Names {
    fn once(&mut self, bit: u8) -> Option<()> {
        let mask = 1 << bit;
        (self.0 & mask == 0).then_some(())?;
        self.0 |= mask;
        Some(())
    }
}

fn skip_ws(json: &[u8], mut i: usize) -> usize {
    while matches!(json.get(i), Some(b' ' | b'\t' | b'\n' | b'\r')) {
        i += 1;
    }
    i
}

/// The object at `json[i]`, nested `depth` deep: each member's name (its raw bytes: a
/// name spelled with escapes is refused, since it may be one of those read) and the
/// index of its value go to `each`, which checks the value and answers the index after
/// it. The index after the object.
fn object<'a>(json: &'a [u8], i: usize, depth: usize,
              mut each: impl FnMut(&'a [u8], usize) -> Option<usize>) -> Option<usize> {
    (depth < MAX_DEPTH && json.get(i) == Some(&b'{')).then_some(())?;
    let mut i = skip_ws(json, i + 1);
    if json.get(i) == Some(&b'}') {
        return Some(i + 1);
    }
    loop {
        (json.get(i) == Some(&b'"')).then_some(())?;
        let name_end = string(json, i)?;
        let name = &json[i + 1..name_end - 1];
        memchr::memchr(b'\\', name).is_none().then_some(())?;
        i = skip_ws(json, name_end);
        (json.get(i) == Some(&b':')).then_some(())?;
        let start = skip_ws(json, i + 1);
        json.get(start)?;
        i = skip_ws(json, each(name, start)?);
        match json.get(i)? {
            b',' => i = skip_ws(json, i + 1),
            b'}' => return Some(i + 1),
            _ => return None,
        }
    }
}

/// The array at `json[i]`, nested `depth` deep: the index of each element to `each`, which
/// answers the index after it. The index after the array.
fn array(json: &[u8], i: usize, depth: usize, mut each: impl FnMut(usize) -> Option<usize>)
         -> Option<usize> {
    (depth < MAX_DEPTH && json.get(i) == Some(&b'[')).then_some(())?;
    let mut i = skip_ws(json, i + 1);
    if json.get(i) == Some(&b']') {
        return Some(i + 1);
    }
    loop {
        json.get(i)?;
        i = skip_ws(json, each(i)?);
        match json.get(i)? {
            b',' => i = skip_ws(json, i + 1),
            b']' => return Some(i + 1),
            _ => return None,
        }
    }
}

fn string_or_null(json: &[u8], at: usize) -> Option<usize> {
    if json[at] == b'"' {
        string(json, at)
    } else {
        json[at..].starts_with(b"null").then_some(at + 4)
    }
}

/// A JSON integer that fits an i64 (what the decoder takes for an `int`) at `json[at]`.
fn integer(json: &[u8], at: usize) -> Option<usize> {
    let start = if json[at] == b'-' { at + 1 } else { at };
    let mut end = start;
    while json.get(end).is_some_and(u8::is_ascii_digit) {
        end += 1;
    }
    let leading_zero = json[start] == b'0' && end > start + 1;
    (end > start && !leading_zero && !matches!(json.get(end), Some(b'.' | b'e' | b'E')))
        .then_some(())?;
    std::str::from_utf8(&json[at..end]).ok()?.parse::<i64>().ok().map(|_| end)
}

const MAX_DEPTH: usize = 64;

/// A valid JSON value at `json[i]`: the index after it.
fn value(json: &[u8], i: usize, depth: usize) -> Option<usize> {
    match *json.get(i)? {
        b'"' => string(json, i),
        b'{' => object(json, i, depth, |_, at| value(json, at, depth + 1)),
        b'[' => array(json, i, depth, |at| value(json, at, depth + 1)),
        b't' => json[i..].starts_with(b"true").then_some(i + 4),
        b'f' => json[i..].starts_with(b"false").then_some(i + 5),
        b'n' => json[i..].starts_with(b"null").then_some(i + 4),
        b'-' | b'0'..=b'9' => number(json, i),
        _ => None,
    }
}

/// A JSON number at `json[i]`: the index after it.
fn number(json: &[u8], mut i: usize) -> Option<usize> {
    let digits = |json: &[u8], mut k: usize| {
        let start = k;
        while json.get(k).is_some_and(u8::is_ascii_digit) {
            k += 1;
        }
        (k > start).then_some(k)
    };
    if json.get(i) == Some(&b'-') {
        i += 1;
    }
    i = if json.get(i) == Some(&b'0') { i + 1 } else { digits(json, i)? };
    if json.get(i) == Some(&b'.') {
        i = digits(json, i + 1)?;
    }
    if matches!(json.get(i), Some(b'e' | b'E')) {
        i += 1;
        if matches!(json.get(i), Some(b'+' | b'-')) {
            i += 1;
        }
        i = digits(json, i)?;
    }
    Some(i)
}

/// A valid JSON string at `json[i]` (a quote): the index after its closing quote.
fn string(json: &[u8], i: usize) -> Option<usize> {
    let mut k = i + 1;
    loop {
        let at = k + memchr::memchr2(b'"', b'\\', json.get(k..)?)?;
        // No raw control character in the stretch before.
        json[k..at].iter().all(|&b| b >= 0x20).then_some(())?;
        if json[at] == b'"' {
            return Some(at + 1);
        }
        k = at + 2;
        match *json.get(at + 1)? {
            b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => {}
            b'u' => {
                // Four hex digits (from_str_radix alone would take a sign).
                json.get(k..k + 4)?.iter().all(u8::is_ascii_hexdigit).then_some(())?;
                let code = hex4(json, k)?;
                k += 4;
                if (0xD800..0xDC00).contains(&code) {
                    // A high surrogate must be followed by a low one (a lone one has no
                    // UTF-8 form: left to the Python decoder).
                    (json.get(k) == Some(&b'\\') && json.get(k + 1) == Some(&b'u'))
                        .then_some(())?;
                    json.get(k + 2..k + 6)?.iter().all(u8::is_ascii_hexdigit).then_some(())?;
                    (0xDC00..0xE000).contains(&hex4(json, k + 2)?).then_some(())?;
                    k += 6;
                } else if (0xDC00..0xE000).contains(&code) {
                    return None;
                }
            }
            _ => return None,
        }
    }
}

use crate::jsonscan::{hex4, unescape};

#[cfg(test)]
mod tests {
    use super::*;

    const T: Template<'static> = Template { head: b"<", middle: b"|", tail: b">", seq: Some(7) };

    fn ev(json: &str) -> Vec<u8> {
        format!("data: {json}\n\n").into_bytes()
    }

    fn run(events: &[&str]) -> Vec<u8> {
        events.iter().flat_map(|e| ev(e)).collect()
    }

    #[test]
    fn text_pieces_copied_as_sent_and_decoded_for_the_text() {
        let r = run(&[
            r#"{"id":"c","choices":[{"index":0,"delta":{"content":"Hi \"there\" \u00e9\ud83d\ude00"},"finish_reason":null}],"usage":null}"#,
            r#"{"id":"c","choices":[{"index":0,"delta":{"role":"assistant","content":""},"logprobs":{"x":[1,2.5e-3]}}]}"#,
            r#"{"choices":[{"delta":{"content":"!"},"finish_reason":"stop"}]}"#,
        ]);
        let got = text_deltas(&r, &T).unwrap();
        assert_eq!(
            got.out,
            br#"<7|"Hi \"there\" \u00e9\ud83d\ude00"><8|"!">"#.to_vec()
        );
        assert_eq!(got.text, "Hi \"there\" \u{e9}\u{1f600}!");
        assert_eq!(got.count, 2);
        assert_eq!(got.first_finish.as_deref(), Some("stop"));
        let plain = Template { head: b"[", middle: b"", tail: b"]", seq: None };
        assert_eq!(text_deltas(&ev(r#"{"choices":[{"delta":{"content":"a"}}]}"#), &plain).unwrap().out, b"[\"a\"]");
    }

    #[test]
    fn anything_else_is_left_to_python() {
        for bad in [
            r#"{"choices":[{"delta":{"tool_calls":[{"index":0}]}}]}"#,
            r#"{"choices":[{"delta":{"refusal":"no"}}]}"#,
            r#"{"choices":[{"delta":{"content":"a","content":"b"}}]}"#,
            r#"{"choices":[{"delta":{"cont\u0065nt":"a"}}]}"#,
            r#"{"choices":[{"delta":{"content":5}}]}"#,
            r#"{"choices":[{"index":1.0,"delta":{"content":"a"}}]}"#,
            r#"{"choices":[{"index":01,"delta":{"content":"a"}}]}"#,
            r#"{"choices":[{"index":99999999999999999999,"delta":{"content":"a"}}]}"#,
            r#"{"id":null,"choices":[]}"#,
            r#"{"choices":[{"delta":{"content":"a"}}],"usage":{"prompt_tokens":1}}"#,
            r#"{"choices":[{"delta":{"content":"a"}}],"x":tru}"#,
            r#"{"choices":[{"delta":{"content":"a\ud800"}}]}"#,
            r#"{"choices":[{"delta":{"content":"a\x"}}]}"#,
            r#"{"choices":[{"delta":{"content":"a\u+041"}}]}"#,
            r#"{"choices":[{"delta":{"content":"\ud83d\u+e00"}}]}"#,
            r#"{"choices":[{"delta":{"content":"a"}}]} x"#,
            r#"{"choices":[{"delta":{"content":"a"}}],}"#,
            r#"{"choices":[1]}"#,
            r#"[1]"#,
            "{\"choices\":[{\"delta\":{\"content\":\"a\tb\"}}]}",
        ] {
            assert_eq!(text_deltas(&ev(bad), &T), None, "{bad}");
        }
        assert_eq!(text_deltas(b": keep-alive\n\n", &T), None);
        assert_eq!(text_deltas(b"data: {}\ndata: {}\n\n", &T), None);
        assert_eq!(text_deltas(b"data: {}\n\n\n\ndata: {}\n\n", &T), None);
        assert_eq!(text_deltas(b"data: {\"choices\":[]}", &T), None);
        assert_eq!(text_deltas(b"data: {\"id\":\"\xff\"}\n\n", &T), None);
        let deep = format!("{{\"x\":{}1{}}}", "[".repeat(100_000), "]".repeat(100_000));
        assert_eq!(text_deltas(&ev(&deep), &T), None);
    }

    #[test]
    fn chunks_in_one_frame_read_as_when_read_whole() {
        let frame = |text: &str, finish: &str| {
            format!(r#"{{"id":"c","choices":[{{"index":0,"delta":{{"content":{text}}},"finish_reason":{finish}}}],"usage":null}}"#)
        };
        let events = [frame(r#""a""#, "null"), frame(r#""\u00e9\"""#, "null"), frame(r#""""#, "null"),
                      frame(r#""b""#, "null"), frame(r#""c""#, r#""stop""#)];
        let got = text_deltas(&run(&events.iter().map(String::as_str).collect::<Vec<_>>()), &T)
            .unwrap();
        assert_eq!(got.out, br#"<7|"a"><8|"\u00e9\""><9|"b"><10|"c">"#.to_vec());
        assert_eq!(got.text, "a\u{e9}\"bc");
        assert_eq!(got.last_finish.as_deref(), Some("stop"));
        // Past a frame, what is not one valid string in it is read whole, and refused
        // when it is not text deltas.
        for bad in [r#""a"#, "\"a\tb\"", r#""a\x""#, r#""a","content":"b""#, r#""a"}}],"x":{"#, "5",
                    r#""a\ud800""#] {
            let r = run(&[&frame(r#""a""#, "null"), &frame(bad, "null")]);
            assert_eq!(text_deltas(&r, &T), None, "{bad}");
        }
    }

    #[test]
    fn nothing_to_say_is_an_empty_answer() {
        let got = text_deltas(&run(&[r#"{"choices":null}"#, r#"{"id":"x"}"#, r#"{"choices":[{"delta":null}]}"#]), &T).unwrap();
        assert_eq!(got, Deltas::default());
    }
}
