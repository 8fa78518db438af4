//! The domain's errors: what can go wrong with a session, in terms a caller can branch on.
//! `grpc/status.rs` maps each one to a gRPC status, exhaustively.

use std::fmt;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The id as the client sent it; the message quotes it bounded (`quoted`).
    #[error("no session with id {}", quoted(.0))]
    SessionNotFound(String),
    #[error("{0}")]
    InvalidArgument(String),
    #[error(
        "graph version mismatch: the session is at version {actual}, the request says \
         {requested}; fetch the session and extend from its current version"
    )]
    GraphVersionMismatch { actual: u64, requested: u64 },
    /// An error TensorFlow reported, with TensorFlow's code (the same numbers as gRPC's).
    #[error("{message}")]
    Tensorflow { code: TfCode, message: String },
    #[error(
        "the session's worker (pid {pid}) died while handling the request: {how}; the session \
         is being restored in a fresh worker (variables are lost unless preserved)"
    )]
    WorkerDied {
        pid: u32,
        /// How it ended, in words ("killed by signal 9 (SIGKILL)").
        how: String,
        /// Set when the kernel killed it at its cgroup's memory limit: that limit.
        memory_limit: Option<u64>,
    },
    #[error("could not start a worker process: {0}")]
    WorkerStart(String),
    #[error("session {0} could not be restored after its worker died; RecycleSession retries")]
    SessionBroken(String),
    /// The memory policy killed the worker under a running step (hard limit).
    #[error("{0}")]
    ResourceExhausted(String),
    /// The operation does not apply to the session as it is (e.g. a graph operation on a
    /// Python session, Python sessions not configured).
    #[error("{0}")]
    FailedPrecondition(String),
    /// A call ran past its deadline and was stopped.
    #[error("{0}")]
    DeadlineExceeded(String),
    #[error("the daemon is shutting down and takes no new work")]
    ShuttingDown,
    /// The request cannot be served now; the message says why and when to retry.
    #[error("{0}")]
    Unavailable(String),
    /// The request was stopped by someone else's action (its session closed under it).
    #[error("{0}")]
    Cancelled(String),
    #[error("worker protocol error: {0}")]
    Protocol(String),
}

/// A TensorFlow status code (`TF_Code`): the same numbers as gRPC status codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TfCode(pub i32);

impl TfCode {
    pub const INVALID_ARGUMENT: TfCode = TfCode(3);
    pub const NOT_FOUND: TfCode = TfCode(5);
    pub const FAILED_PRECONDITION: TfCode = TfCode(9);
    pub const INTERNAL: TfCode = TfCode(13);
}

impl fmt::Display for TfCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// How many characters of a client-supplied string an error message quotes.
pub const QUOTED_CHARS: usize = 64;

/// A client-supplied string (a session id, a feed or fetch name, a label) as an error message
/// quotes it: whole and Debug-quoted when short, else its first `QUOTED_CHARS` characters and
/// how long it was: `"abc"… (1048576 bytes)`. An error must never echo unbounded input: a
/// 16 MiB session id echoed whole made the status larger than gRPC's metadata limit, so the
/// client saw a transport error instead of the real one.
pub fn quoted(text: &str) -> Quoted<'_> {
    Quoted(text)
}

/// See `quoted`.
#[derive(Debug, Clone, Copy)]
pub struct Quoted<'a>(&'a str);

impl fmt::Display for Quoted<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0.char_indices().nth(QUOTED_CHARS) {
            None => write!(f, "{:?}", self.0),
            Some((cut, _)) => write!(f, "{:?}… ({} bytes)", &self.0[..cut], self.0.len()),
        }
    }
}

/// The longest status message the daemon sends. A status travels in HTTP/2 trailers, and
/// gRPC clients refuse metadata past 8–16 KiB (grpcio's default is 8 KiB, percent-encoding
/// included), so a longer message would reach the client as a transport error and the real
/// one would be lost.
pub const MAX_STATUS_MESSAGE_BYTES: usize = 4096;

/// Of a message cut to `MAX_STATUS_MESSAGE_BYTES`, how many encoded bytes of its end are
/// kept: TensorFlow puts the failing node (`[[{{node ...}}]]`) last.
const KEPT_TAIL_BYTES: usize = 1024;

/// How many bytes `byte` takes in the `grpc-message` trailer, which percent-encodes every
/// byte outside printable ASCII (and `%` itself): a non-ASCII character costs three times
/// its UTF-8 length there.
fn encoded_len(byte: u8) -> usize {
    if (0x20..=0x7e).contains(&byte) && byte != b'%' {
        1
    } else {
        3
    }
}

/// What `character` costs in the trailer.
fn encoded_char_len(character: char) -> usize {
    character
        .encode_utf8(&mut [0; 4])
        .bytes()
        .map(encoded_len)
        .sum()
}

/// `message` within `MAX_STATUS_MESSAGE_BYTES` as it travels (percent-encoded): its
/// beginning and its end, with what was cut between them said in words.
pub fn clip_message(message: String) -> String {
    let encoded: usize = message.bytes().map(encoded_len).sum();
    if encoded <= MAX_STATUS_MESSAGE_BYTES {
        return message;
    }
    // The note between head and tail takes well under the 96 bytes left for it.
    let head_budget = MAX_STATUS_MESSAGE_BYTES - KEPT_TAIL_BYTES - 96;
    let mut used = 0;
    let mut head_end = 0;
    for (at, character) in message.char_indices() {
        used += encoded_char_len(character);
        if used > head_budget {
            break;
        }
        head_end = at + character.len_utf8();
    }
    let mut used = 0;
    let mut tail_start = message.len();
    for (at, character) in message.char_indices().rev() {
        used += encoded_char_len(character);
        if used > KEPT_TAIL_BYTES || at < head_end {
            break;
        }
        tail_start = at;
    }
    format!(
        "{} … [{} bytes cut; the message had {}] … {}",
        &message[..head_end],
        tail_start - head_end,
        message.len(),
        &message[tail_start..]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_strings_are_quoted_whole_and_long_ones_cut_with_their_length() {
        assert_eq!(quoted("s-1").to_string(), "\"s-1\"");
        let exact = "x".repeat(QUOTED_CHARS);
        assert_eq!(quoted(&exact).to_string(), format!("{exact:?}"));
        let long = "é".repeat(1 << 20);
        let text = quoted(&long).to_string();
        assert_eq!(
            text,
            format!("{:?}… ({} bytes)", "é".repeat(QUOTED_CHARS), 2 << 20)
        );
        let error = Error::SessionNotFound("s".repeat(16 << 20));
        assert!(error.to_string().len() < 200, "{error}");
        assert!(
            error
                .to_string()
                .ends_with(&format!("… ({} bytes)", 16 << 20))
        );
    }

    #[test]
    fn long_messages_keep_their_beginning_and_end() {
        assert_eq!(clip_message("short".into()), "short");
        let exact = "m".repeat(MAX_STATUS_MESSAGE_BYTES);
        assert_eq!(clip_message(exact.clone()), exact);
        let long = format!("Fetch {} not found [[{{{{node y}}}}]]", "ü".repeat(1 << 20));
        let clipped = clip_message(long.clone());
        let encoded: usize = clipped.bytes().map(encoded_len).sum();
        assert!(encoded <= MAX_STATUS_MESSAGE_BYTES, "{}", clipped.len());
        assert!(clipped.starts_with("Fetch üü"));
        assert!(
            clipped.ends_with("üü not found [[{{node y}}]]"),
            "{clipped}"
        );
        assert!(clipped.contains(&format!("the message had {}]", long.len())));
    }
}
