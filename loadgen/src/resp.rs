//! The Redis side of the reply parser: RESP2 replies (and RESP3's null), parsed in place like
//! glockd's lines, for the side-by-side runs against Redis.

use crate::wire::{line_end, parse_i64, show, Parsed, Raw, MAX_REPLY};

/// RESP2 (and RESP3's null): `+`, `-`, `:`, `$`.
pub fn parse_resp(buf: &[u8]) -> Parsed<'_> {
    let end = match line_end(buf) {
        Ok(end) => end,
        Err(parsed) => return parsed,
    };
    if end < 2 || buf[end - 1] != b'\r' {
        return Parsed::Malformed(format!("not a RESP line: {}", show(&buf[..end])));
    }
    let head = &buf[1..end - 1];
    let raw = match buf[0] {
        b'+' => Raw::Simple(head),
        b'-' => Raw::Error(head),
        b'_' => Raw::Nil,
        b':' => match parse_i64(head) {
            Some(n) => Raw::Int(n),
            None => return Parsed::Malformed(format!("bad integer: {}", show(&buf[..end]))),
        },
        b'$' => match parse_i64(head) {
            Some(-1) => Raw::Nil,
            Some(len) if len >= 0 && (len as usize) <= MAX_REPLY => {
                let start = end + 1;
                let stop = start + len as usize;
                if buf.len() < stop + 2 {
                    return Parsed::Incomplete;
                }
                if &buf[stop..stop + 2] != b"\r\n" {
                    return Parsed::Malformed(format!("bad bulk: {}", show(&buf[..stop + 2])));
                }
                return Parsed::Reply(Raw::Bulk(&buf[start..stop]), stop + 2);
            }
            _ => return Parsed::Malformed(format!("bad bulk length: {}", show(&buf[..end]))),
        },
        _ => return Parsed::Malformed(format!("unexpected RESP type: {}", show(&buf[..end]))),
    };
    Parsed::Reply(raw, end + 1)
}

#[cfg(test)]
mod tests {
    use crate::wire::{classify, parse, Cmd, Outcome, Parsed, Raw, Target};

    #[test]
    fn resp_replies_parse_and_classify() {
        let buf = b"+OK\r\n$-1\r\n:1\r\n-ERR no\r\n$3\r\nabc\r\n$3\r\nab";
        let mut at = 0;
        let mut seen = Vec::new();
        while let Parsed::Reply(raw, used) = parse(Target::Redis, &buf[at..]) {
            seen.push(format!("{raw:?}"));
            at += used;
        }
        assert_eq!(seen.len(), 5);
        assert_eq!(parse(Target::Redis, &buf[at..]), Parsed::Incomplete);
        assert_eq!(
            classify(Target::Redis, Cmd::Get, &Raw::Simple(b"OK")),
            Some(Outcome::Granted)
        );
        assert_eq!(
            classify(Target::Redis, Cmd::Get, &Raw::Nil),
            Some(Outcome::Refused)
        );
        assert_eq!(classify(Target::Redis, Cmd::Get, &Raw::Error(b"ERR")), None);
        assert!(matches!(
            parse(Target::Redis, b"*1\r\n"),
            Parsed::Malformed(_)
        ));
    }
}
