//! Token ids -> streamed text: whole UTF-8 characters only, and stop strings never partly emitted.

use super::codec::{CodecError, TokenCodec};

/// Incremental decoding: the text of a growing id sequence, released as soon as it is stable.
///
/// Decoding a single token alone breaks multi-byte characters split over tokens and tokenizers
/// that add a space depending on the previous token, so each step decodes a short window that
/// starts a few tokens back and releases only what the window adds, once it no longer ends in a
/// replacement character (an incomplete UTF-8 sequence).
#[derive(Debug, Default, Clone)]
pub struct IncrementalDecoder {
    prefix_offset: usize,
    read_offset: usize,
}

impl IncrementalDecoder {
    /// Starts after `context` ids (the prompt), whose text is never emitted.
    pub fn new(context_len: usize) -> Self {
        // A few tokens of context make the first output token decode as it would mid-sentence.
        let prefix_offset = context_len.saturating_sub(5);
        Self {
            prefix_offset,
            read_offset: context_len,
        }
    }

    /// The text that `ids` (all ids so far, prompt included) adds to what was released before.
    pub fn step(&mut self, codec: &dyn TokenCodec, ids: &[u32]) -> Result<String, CodecError> {
        let prefix_text = codec.decode(&ids[self.prefix_offset..self.read_offset], true)?;
        let full_text = codec.decode(&ids[self.prefix_offset..], true)?;
        if full_text.len() <= prefix_text.len() || full_text.ends_with('\u{FFFD}') {
            return Ok(String::new());
        }
        let delta = match full_text.get(prefix_text.len()..) {
            Some(delta) if full_text.starts_with(&prefix_text) => delta.to_owned(),
            // The window's text changed before the boundary (rare normalisation effects): the
            // part past the longest common prefix is what is new.
            _ => {
                let common = common_prefix_len(&prefix_text, &full_text);
                full_text[common..].to_owned()
            }
        };
        self.prefix_offset = self.read_offset;
        self.read_offset = ids.len();
        Ok(delta)
    }
}

fn common_prefix_len(a: &str, b: &str) -> usize {
    a.char_indices()
        .zip(b.chars())
        .find(|((_, x), y)| x != y)
        .map_or(a.len().min(b.len()), |((index, _), _)| index)
}

/// Holds back text that might be the start of a stop string, and cuts the text at the first stop.
#[derive(Debug, Default, Clone)]
pub struct StopStringMatcher {
    stops: Vec<String>,
    held: String,
}

/// Text released by [`StopStringMatcher::push`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Released {
    pub text: String,
    /// A stop string matched: the text ends right before it and generation must stop.
    pub stopped: bool,
}

impl StopStringMatcher {
    pub fn new(stops: Vec<String>) -> Self {
        Self {
            stops,
            held: String::new(),
        }
    }

    /// Adds new text; returns what may be emitted now.
    pub fn push(&mut self, delta: &str) -> Released {
        if self.stops.is_empty() {
            return Released {
                text: delta.to_owned(),
                stopped: false,
            };
        }
        self.held.push_str(delta);
        let first_stop = self
            .stops
            .iter()
            .filter_map(|stop| self.held.find(stop.as_str()))
            .min();
        if let Some(at) = first_stop {
            let text = self.held[..at].to_owned();
            self.held.clear();
            return Released {
                text,
                stopped: true,
            };
        }
        let keep = self.longest_partial_stop_suffix();
        let text = self.held[..self.held.len() - keep].to_owned();
        self.held.drain(..self.held.len() - keep);
        Released {
            text,
            stopped: false,
        }
    }

    /// Everything still held back, for when generation ends without a stop string.
    pub fn flush(&mut self) -> String {
        std::mem::take(&mut self.held)
    }

    /// Length in bytes of the longest suffix of the held text that a stop string starts with.
    fn longest_partial_stop_suffix(&self) -> usize {
        let mut longest = 0;
        for (start, _) in self.held.char_indices() {
            let suffix = &self.held[start..];
            if self.stops.iter().any(|stop| stop.starts_with(suffix)) {
                longest = suffix.len();
                break;
            }
        }
        longest
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::codec::tests::ByteCodec;

    fn stream(text: &str, prompt: &str) -> Vec<String> {
        let codec = ByteCodec;
        let mut ids = codec.encode(prompt, false).unwrap();
        let mut decoder = IncrementalDecoder::new(ids.len());
        let mut deltas = Vec::new();
        for byte in text.bytes() {
            ids.push(u32::from(byte));
            deltas.push(decoder.step(&codec, &ids).unwrap());
        }
        deltas
    }

    #[test]
    fn multi_byte_characters_are_released_whole() {
        let deltas = stream("aé€😀b", "prompt ");
        assert_eq!(deltas.concat(), "aé€😀b");
        assert!(deltas.iter().all(|d| !d.contains('\u{FFFD}')));
        // "é" is two bytes: nothing after the first, the whole character after the second.
        assert_eq!(&deltas[1..3], &["".to_owned(), "é".to_owned()]);
    }

    #[test]
    fn prompt_text_is_never_emitted() {
        assert_eq!(stream("xyz", "héllo").concat(), "xyz");
    }

    #[test]
    fn stop_strings_are_cut_and_never_partly_emitted() {
        let mut matcher = StopStringMatcher::new(vec!["STOP".into(), "\n\n".into()]);
        let mut emitted = String::new();
        let mut stopped = false;
        for piece in ["hello S", "T", "O", "x ST", "OP and more"] {
            let released = matcher.push(piece);
            emitted.push_str(&released.text);
            assert!(
                !emitted.contains("ST") || emitted.ends_with("STOx "),
                "{emitted}"
            );
            if released.stopped {
                stopped = true;
                break;
            }
        }
        assert!(stopped);
        assert_eq!(emitted, "hello STOx ");
    }

    #[test]
    fn held_text_is_flushed_at_the_end() {
        let mut matcher = StopStringMatcher::new(vec!["</s>".into()]);
        assert_eq!(matcher.push("abc</").text, "abc");
        assert_eq!(matcher.flush(), "</");
    }

    #[test]
    fn earliest_stop_wins() {
        let mut matcher = StopStringMatcher::new(vec!["cd".into(), "b".into()]);
        assert_eq!(
            matcher.push("abcd"),
            Released {
                text: "a".into(),
                stopped: true
            }
        );
    }
}
