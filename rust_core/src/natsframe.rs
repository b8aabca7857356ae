//! Cutting JetStream deliveries out of the bytes a raw NATS connection received.
//!
//! Reading the stream (a replay, the projections' live tail) means one
//! `HMSG` frame per stored message. In Python, cutting a frame out of the
//! buffer (a regex match, its groups, three integer conversions, the payload
//! slice) costs about as much as decoding the event; here it is a scan over
//! the control line. Only the common frame is handled: a delivery with
//! headers on the given subscription, with the 9-token
//! `$JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>`
//! reply. Anything else (flow control, heartbeats, API replies, `PING`, the
//! longer reply form) stops the scan so the caller's generic parser can take
//! that one frame, after which it scans again.

/// Where a scan stopped and what it found.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Scan {
    /// Position of the first byte not consumed.
    pub pos: usize,
    /// Consumer sequence of the last delivery (the `delivered` passed in if none).
    pub delivered: u64,
    /// The server's count of messages after the last delivery, if there was one.
    pub pending: Option<u64>,
}

/// A delivery whose consumer sequence is not the one after the previous: a lost message.
#[derive(Debug, PartialEq, Eq)]
pub struct Gap {
    pub expected: u64,
    pub got: u64,
}

/// The longest control line looked at; a longer one is left to the caller.
const MAX_CONTROL_LINE: usize = 4096;

fn find_crlf(buf: &[u8], from: usize) -> Option<usize> {
    let limit = buf.len().min(from.saturating_add(MAX_CONTROL_LINE));
    let window = buf.get(from..limit)?;
    window.windows(2).position(|w| w == b"\r\n").map(|i| from + i)
}

fn number(token: &[u8]) -> Option<u64> {
    if token.is_empty() || token.len() > 19 {
        return None;
    }
    token.iter().try_fold(0u64, |acc, &b| {
        b.is_ascii_digit().then(|| acc * 10 + u64::from(b - b'0'))
    })
}

/// One delivery's control line: (stream seq, consumer seq, pending, header len, total len).
fn control_line(line: &[u8], sid: &[u8]) -> Option<(u64, u64, u64, usize, usize)> {
    let mut parts = line.split(|&b| b == b' ');
    let (op, _subject, s, reply, hlen, tlen) = (
        parts.next()?, parts.next()?, parts.next()?, parts.next()?, parts.next()?, parts.next()?,
    );
    if op != b"HMSG" || s != sid || parts.next().is_some() {
        return None;
    }
    let acked = reply.strip_prefix(b"$JS.ACK.")?;
    let mut t = acked.split(|&b| b == b'.');
    // stream, consumer, delivered count, stream seq, consumer seq, timestamp, pending
    let (_stream, _consumer, _count) = (t.next()?, t.next()?, t.next()?);
    let (sseq, cseq, _ts, pending) = (t.next()?, t.next()?, t.next()?, t.next()?);
    if t.next().is_some() {
        return None; // the longer form (domain, account hash): the caller's parser
    }
    let (hlen, tlen) = (number(hlen)? as usize, number(tlen)? as usize);
    if hlen > tlen {
        return None;
    }
    Some((number(sseq)?, number(cseq)?, number(pending)?, hlen, tlen))
}

/// Scan the frames starting before `end` from `pos`, appending each delivery on
/// subscription `sid` as (stream sequence, payload start, payload end) to `out`.
///
/// Stops at an incomplete frame, at a frame of any other kind, or once `pos`
/// reaches `end`. Consumer sequences must follow `delivered` one by one.
pub fn scan_deliveries(
    buf: &[u8],
    pos: usize,
    end: usize,
    sid: &[u8],
    delivered: u64,
    out: &mut Vec<(u64, usize, usize)>,
) -> Result<Scan, Gap> {
    let mut scan = Scan { pos, delivered, pending: None };
    let end = end.min(buf.len());
    while scan.pos < end {
        let Some(eol) = find_crlf(buf, scan.pos) else { break };
        let Some((sseq, cseq, pending, hlen, tlen)) = control_line(&buf[scan.pos..eol], sid)
        else {
            break;
        };
        let start = eol + 2;
        let Some(stop) = start.checked_add(tlen) else { break };
        if stop.saturating_add(2) > buf.len() {
            break; // the rest has not arrived yet
        }
        if cseq != scan.delivered + 1 {
            return Err(Gap { expected: scan.delivered + 1, got: cseq });
        }
        out.push((sseq, start + hlen, stop));
        scan.delivered = cseq;
        scan.pending = Some(pending);
        scan.pos = stop + 2;
    }
    Ok(scan)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(sid: &str, sseq: u64, cseq: u64, pending: u64, hdr: &str, body: &str) -> Vec<u8> {
        let reply = format!("$JS.ACK.TOLLWAY.c1.1.{sseq}.{cseq}.1700000000000000000.{pending}");
        let total = hdr.len() + body.len();
        format!("HMSG tollway.call.completed.acme {sid} {reply} {} {total}\r\n{hdr}{body}\r\n",
                hdr.len())
        .into_bytes()
    }

    const HDR: &str = "NATS/1.0\r\nNats-Msg-Id: e1\r\n\r\n";

    #[test]
    fn cuts_consecutive_deliveries() {
        let mut buf = frame("7", 10, 1, 2, HDR, "{\"a\":1}");
        buf.extend(frame("7", 12, 2, 1, HDR, "{\"b\":22}"));
        buf.extend(frame("7", 13, 3, 0, HDR, ""));
        let mut out = Vec::new();
        let scan = scan_deliveries(&buf, 0, buf.len(), b"7", 0, &mut out).unwrap();
        assert_eq!(scan, Scan { pos: buf.len(), delivered: 3, pending: Some(0) });
        let payloads: Vec<(u64, &[u8])> = out.iter().map(|&(s, a, b)| (s, &buf[a..b])).collect();
        assert_eq!(payloads, vec![(10, &b"{\"a\":1}"[..]), (12, b"{\"b\":22}"), (13, b"")]);
    }

    #[test]
    fn stops_at_an_incomplete_frame_and_resumes() {
        let mut buf = frame("7", 1, 1, 1, HDR, "{}");
        let first = buf.len();
        let second = frame("7", 2, 2, 0, HDR, "{\"x\":2}");
        for cut in [first + 3, first + 60, first + second.len() - 1] {
            let mut partial = buf.clone();
            partial.extend(&second[..cut - first]);
            let mut out = Vec::new();
            let scan = scan_deliveries(&partial, 0, partial.len(), b"7", 0, &mut out).unwrap();
            assert_eq!((scan.pos, scan.delivered, out.len()), (first, 1, 1), "cut at {cut}");
        }
        buf.extend(second);
        let mut out = Vec::new();
        let scan = scan_deliveries(&buf, first, buf.len(), b"7", 1, &mut out).unwrap();
        assert_eq!((scan.pos, scan.delivered, out[0].0), (buf.len(), 2, 2));
    }

    #[test]
    fn leaves_other_frames_to_the_caller() {
        let delivery = frame("7", 1, 1, 0, HDR, "{}");
        let others: [&[u8]; 6] = [
            b"PING\r\n",
            b"MSG _INBOX.x.1 1 5\r\nhello\r\n",
            b"HMSG _INBOX.d.7 7 $JS.FC.TOLLWAY.x.1 12 12\r\nNATS/1.0 100\r\n\r\n\r\n",
            b"HMSG _INBOX.d.7 7 28 28\r\nNATS/1.0 100 Idle Heartbeat\r\n\r\n",
            // another subscription, and the long reply form
            b"HMSG s 8 $JS.ACK.TOLLWAY.c.1.1.1.1.0 2 2\r\n\r\n\r\n",
            b"HMSG s 7 $JS.ACK.dom.hash.TOLLWAY.c.1.1.1.1.0.tok 2 2\r\n\r\n\r\n",
        ];
        for other in others {
            let mut buf = delivery.clone();
            buf.extend_from_slice(other);
            buf.extend(frame("7", 2, 2, 0, HDR, "{}"));
            let mut out = Vec::new();
            let scan = scan_deliveries(&buf, 0, buf.len(), b"7", 0, &mut out).unwrap();
            assert_eq!((scan.pos, out.len()), (delivery.len(), 1), "{:?}", other);
        }
    }

    #[test]
    fn a_missing_delivery_is_a_gap() {
        let mut buf = frame("7", 1, 5, 1, HDR, "{}");
        buf.extend(frame("7", 3, 7, 0, HDR, "{}"));
        let mut out = Vec::new();
        let err = scan_deliveries(&buf, 0, buf.len(), b"7", 4, &mut out).unwrap_err();
        assert_eq!(err, Gap { expected: 6, got: 7 });
        assert_eq!(out.len(), 1);
    }

    #[test]
    fn end_bounds_where_frames_may_start() {
        let one = frame("7", 1, 1, 1, HDR, "{}");
        let mut buf = one.clone();
        buf.extend(frame("7", 2, 2, 0, HDR, "{}"));
        let mut out = Vec::new();
        let scan = scan_deliveries(&buf, 0, 1, b"7", 0, &mut out).unwrap();
        assert_eq!((scan.pos, out.len()), (one.len(), 1), "a frame starting before end is whole");
        let scan = scan_deliveries(&buf, 0, 0, b"7", 0, &mut out).unwrap();
        assert_eq!(scan, Scan { pos: 0, delivered: 0, pending: None });
    }

    #[test]
    fn numbers_and_lengths_are_checked() {
        assert_eq!(number(b"0"), Some(0));
        assert_eq!(number(b"18446744073709551615"), None, "20 digits: not taken");
        assert_eq!(number(b"12a"), None);
        assert_eq!(number(b""), None);
        let bad = b"HMSG s 7 $JS.ACK.T.c.1.1.1.1.0 9 2\r\n\r\n\r\n"; // header longer than total
        let mut out = Vec::new();
        let scan = scan_deliveries(bad, 0, bad.len(), b"7", 0, &mut out).unwrap();
        assert_eq!((scan.pos, out.len()), (0, 0));
    }
}
