//! The member names of a JSON object's top level, read without building its values.
//!
//! The gateway decodes a request body into typed fields (msgspec), which keeps the last of
//! two members of the same name; a provider reading the bytes it is forwarded may take the
//! first. [`duplicate_member`] finds such a body in one pass over its bytes, skipping every
//! value, and compares names as JSON means them (escapes decoded: `"a"` and `"\u0061"` are
//! one name).
//!
//! The input is expected to be JSON that has already been decoded successfully; on bytes
//! that are not a JSON object the answer is `None` (nothing to say), never a panic.

use std::borrow::Cow;
use std::collections::HashSet;

/// Names compared in a list up to this many; a set holds them past it.
const SET_FROM: usize = 16;

/// The first member name that the top-level object of `body` holds twice; `Some(None)`
/// when every name is distinct; `None` when `body` is not a JSON object.
pub fn duplicate_member(body: &[u8]) -> Option<Option<String>> {
    let mut s = Scan { b: body, i: 0 };
    s.ws();
    if s.peek()? != b'{' {
        return None;
    }
    s.i += 1;
    // A request has a dozen members; a hostile one may have a hundred thousand: a list
    // scanned while short, a set past that (each name compared once either way).
    let mut few: Vec<Cow<'_, [u8]>> = Vec::new();
    let mut many: HashSet<Cow<'_, [u8]>> = HashSet::new();
    s.ws();
    if s.peek()? == b'}' {
        return Some(None);
    }
    loop {
        s.ws();
        let name = s.string()?;
        let seen = if many.is_empty() && few.len() < SET_FROM {
            let seen = few.contains(&name);
            if !seen {
                few.push(name.clone());
            }
            seen
        } else {
            if many.is_empty() {
                many.extend(few.drain(..));
            }
            !many.insert(name.clone())
        };
        if seen {
            return Some(Some(String::from_utf8_lossy(&name).into_owned()));
        }
        s.ws();
        if s.peek()? != b':' {
            return None;
        }
        s.i += 1;
        s.ws();
        s.value()?;
        s.ws();
        match s.peek()? {
            b',' => s.i += 1,
            b'}' => return Some(None),
            _ => return None,
        }
    }
}

struct Scan<'a> {
    b: &'a [u8],
    i: usize,
}

impl<'a> Scan<'a> {
    fn peek(&self) -> Option<u8> {
        self.b.get(self.i).copied()
    }

    fn ws(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.peek() {
            self.i += 1;
        }
    }

    /// A string at the cursor, unescaped (borrowed when it has no escape).
    fn string(&mut self) -> Option<Cow<'a, [u8]>> {
        if self.peek()? != b'"' {
            return None;
        }
        let start = self.i + 1;
        let mut j = start;
        let mut escaped = false;
        loop {
            match *self.b.get(j)? {
                b'"' => break,
                b'\\' => {
                    escaped = true;
                    j += 2;
                }
                _ => j += 1,
            }
        }
        self.i = j + 1;
        let raw = &self.b[start..j];
        if !escaped {
            return Some(Cow::Borrowed(raw));
        }
        unescape(raw).map(Cow::Owned)
    }

    /// Past one value at the cursor: strings skipped with their escapes, arrays and objects
    /// by depth, anything else up to the next delimiter.
    fn value(&mut self) -> Option<()> {
        match self.peek()? {
            b'"' => {
                self.skip_string()?;
            }
            b'{' | b'[' => {
                let mut depth = 0usize;
                loop {
                    match self.peek()? {
                        b'"' => {
                            self.skip_string()?;
                            continue;
                        }
                        b'{' | b'[' => depth += 1,
                        b'}' | b']' => {
                            depth -= 1;
                            if depth == 0 {
                                self.i += 1;
                                return Some(());
                            }
                        }
                        _ => {}
                    }
                    self.i += 1;
                }
            }
            _ => {
                while let Some(c) = self.peek() {
                    if matches!(c, b',' | b'}' | b']' | b' ' | b'\t' | b'\n' | b'\r') {
                        break;
                    }
                    self.i += 1;
                }
            }
        }
        Some(())
    }

    fn skip_string(&mut self) -> Option<()> {
        let mut j = self.i + 1;
        loop {
            match *self.b.get(j)? {
                b'"' => break,
                b'\\' => j += 2,
                _ => j += 1,
            }
        }
        self.i = j + 1;
        Some(())
    }
}

pub(crate) fn hex4(raw: &[u8], at: usize) -> Option<u32> {
    let digits = raw.get(at..at + 4)?;
    let text = std::str::from_utf8(digits).ok()?;
    u32::from_str_radix(text, 16).ok()
}

/// The bytes a JSON string's body stands for (UTF-8), its escapes decoded.
pub(crate) fn unescape(raw: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(raw.len());
    let mut k = 0;
    while k < raw.len() {
        let c = raw[k];
        if c != b'\\' {
            out.push(c);
            k += 1;
            continue;
        }
        let e = *raw.get(k + 1)?;
        k += 2;
        let simple = match e {
            b'"' => b'"',
            b'\\' => b'\\',
            b'/' => b'/',
            b'b' => 0x08,
            b'f' => 0x0c,
            b'n' => b'\n',
            b'r' => b'\r',
            b't' => b'\t',
            b'u' => {
                let mut code = hex4(raw, k)?;
                k += 4;
                if (0xD800..0xDC00).contains(&code) {
                    // A high surrogate: the low half of the pair follows as its own `\u` escape.
                    if raw.get(k) == Some(&b'\\') && raw.get(k + 1) == Some(&b'u') {
                        if let Some(low) = hex4(raw, k + 2) {
                            if (0xDC00..0xE000).contains(&low) {
                                code = 0x10000 + ((code - 0xD800) << 10) + (low - 0xDC00);
                                k += 6;
                            }
                        }
                    }
                }
                // A lone surrogate has no UTF-8 form: kept as U+FFFD, as decoders do.
                let ch = char::from_u32(code).unwrap_or('\u{FFFD}');
                let mut buf = [0u8; 4];
                out.extend_from_slice(ch.encode_utf8(&mut buf).as_bytes());
                continue;
            }
            _ => return None,
        };
        out.push(simple);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::duplicate_member;

    fn dup(body: &str) -> Option<Option<String>> {
        duplicate_member(body.as_bytes())
    }

    #[test]
    fn distinct_names_pass() {
        assert_eq!(
            dup(r#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#),
            Some(None)
        );
        assert_eq!(dup(" { } "), Some(None));
        assert_eq!(
            dup(r#"{"a": {"a": 1, "a": 2}, "b": [1, {"a": 3}]}"#),
            Some(None)
        );
    }

    #[test]
    fn a_name_twice_is_found_whatever_the_spacing() {
        assert_eq!(
            dup(r#"{"model":"a","model":"b"}"#),
            Some(Some("model".into()))
        );
        assert_eq!(
            dup("{ \"a\" : 1 ,\n\t\"b\":2, \"a\" :3 }"),
            Some(Some("a".into()))
        );
    }

    #[test]
    fn names_compare_as_json_means_them() {
        assert_eq!(
            dup(r#"{"model":1,"\u006dodel":2}"#),
            Some(Some("model".into()))
        );
        assert_eq!(dup(r#"{"a\"b":1,"a\u0022b":2}"#), Some(Some("a\"b".into())));
        assert_eq!(dup(r#"{"\ud83d\ude00":1,"😀":2}"#), Some(Some("😀".into())));
        assert_eq!(dup(r#"{"a\\":1,"a":2}"#), Some(None));
    }

    #[test]
    fn values_that_look_like_members_are_skipped() {
        let body = r#"{"a":"\",\"a\":1","b":["}",{"a":"]"}],"c":-1.5e3,"d":null,"e":true}"#;
        assert_eq!(dup(body), Some(None));
        assert_eq!(dup(r#"{"x":"\\","x":1}"#), Some(Some("x".into())));
    }

    #[test]
    fn many_members_are_checked_by_set() {
        let mut body = String::from("{");
        for i in 0..100_000 {
            body.push_str(&format!("\"m{i}\":{i},"));
        }
        let unique = format!("{}\"last\":0}}", body);
        assert_eq!(dup(&unique), Some(None));
        let twice = format!("{}\"m77777\":0}}", body);
        assert_eq!(dup(&twice), Some(Some("m77777".into())));
        let early = String::from("{\"a\":1,\"b\":2,\"a\":3}");
        assert_eq!(dup(&early), Some(Some("a".into())));
    }

    #[test]
    fn not_an_object_says_nothing_and_does_not_panic() {
        for body in [
            "",
            "[]",
            "1",
            "\"a\"",
            "{",
            "{\"a\"",
            "{\"a\":",
            "{\"a\":1",
            "{\"a\\",
            "{\"a\":[1,",
            "{\"\\u12\":1}",
            "{\"a\":1 \"b\":2}",
        ] {
            assert_eq!(dup(body), None, "{body:?}");
        }
    }
}
