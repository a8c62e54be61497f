//! Token ids -> streamed text: whole UTF-8 characters only, and stop strings never partly emitted.

use std::collections::HashSet;

use aho_corasick::{AhoCorasick, MatchKind};

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

    /// The text still held back when the generation ends: what `ids` add past the last release,
    /// even an incomplete character (as U+FFFD, as decoding all ids at once shows it), so that the
    /// streamed pieces add up to the decoded output.
    pub fn finish(&mut self, codec: &dyn TokenCodec, ids: &[u32]) -> Result<String, CodecError> {
        let prefix_text = codec.decode(&ids[self.prefix_offset..self.read_offset], true)?;
        let full_text = codec.decode(&ids[self.prefix_offset..], true)?;
        self.prefix_offset = ids.len();
        self.read_offset = ids.len();
        Ok(match full_text.strip_prefix(prefix_text.as_str()) {
            Some(rest) => rest.to_owned(),
            None => full_text[common_prefix_len(&prefix_text, &full_text)..].to_owned(),
        })
    }
}

fn common_prefix_len(a: &str, b: &str) -> usize {
    a.char_indices()
        .zip(b.chars())
        .find(|((_, x), y)| x != y)
        .map_or(a.len().min(b.len()), |((index, _), _)| index)
}

/// Most stop strings one request may give.
pub const MAX_STOP_STRINGS: usize = 16;
/// Longest stop string, in bytes.
pub const MAX_STOP_STRING_BYTES: usize = 256;

/// Holds back text that might be the start of a stop string, and cuts the text at the first stop.
///
/// Each token costs time linear in the text it adds plus the longest stop string, whatever the
/// number of stops: one Aho-Corasick automaton finds the earliest stop, and a set of every stop's
/// proper prefixes finds the longest held-back suffix.
#[derive(Debug, Default, Clone)]
pub struct StopStringMatcher {
    automaton: Option<AhoCorasick>,
    /// Every proper prefix of every stop string.
    prefixes: HashSet<String>,
    /// Length of the longest stop string, in bytes.
    longest: usize,
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
    /// A matcher for `stops`; the request validation keeps them within [`MAX_STOP_STRINGS`] and
    /// [`MAX_STOP_STRING_BYTES`] and non-empty.
    pub fn new(stops: Vec<String>) -> Self {
        let stops: Vec<String> = stops.into_iter().filter(|s| !s.is_empty()).collect();
        if stops.is_empty() {
            return Self::default();
        }
        let automaton = AhoCorasick::builder()
            .match_kind(MatchKind::LeftmostFirst)
            .build(&stops)
            .ok();
        let prefixes = stops
            .iter()
            .flat_map(|stop| {
                stop.char_indices()
                    .skip(1)
                    .map(|(end, _)| stop[..end].to_owned())
            })
            .collect();
        Self {
            automaton,
            prefixes,
            longest: stops.iter().map(String::len).max().unwrap_or(0),
            held: String::new(),
        }
    }

    /// Adds new text; returns what may be emitted now.
    pub fn push(&mut self, delta: &str) -> Released {
        let Some(automaton) = &self.automaton else {
            return Released {
                text: delta.to_owned(),
                stopped: false,
            };
        };
        // The held text is shorter than the longest stop, so the search costs the new text plus
        // that length.
        self.held.push_str(delta);
        if let Some(found) = automaton.find(&self.held) {
            let text = self.held[..found.start()].to_owned();
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
        let earliest = floor_char_boundary(
            &self.held,
            self.held
                .len()
                .saturating_sub(self.longest.saturating_sub(1)),
        );
        self.held[earliest..]
            .char_indices()
            .map(|(start, _)| &self.held[earliest + start..])
            .find(|suffix| self.prefixes.contains(*suffix))
            .map_or(0, str::len)
    }
}

/// The largest char boundary of `text` at or below `index`.
fn floor_char_boundary(text: &str, index: usize) -> usize {
    let mut index = index.min(text.len());
    while !text.is_char_boundary(index) {
        index -= 1;
    }
    index
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

    #[test]
    fn overlapping_stops_hold_the_longest_possible_start() {
        let mut matcher = StopStringMatcher::new(vec!["abcd".into(), "bcx".into(), "é!".into()]);
        // "abc" may start "abcd", and its suffix "bc" may start "bcx": all of it is held.
        assert_eq!(matcher.push("zzabc").text, "zz");
        // "abce" starts no stop any more; "é" (two bytes) may start "é!".
        assert_eq!(matcher.push("eé").text, "abce");
        assert_eq!(
            matcher.push("!"),
            Released {
                text: String::new(),
                stopped: true
            }
        );
        let mut matcher = StopStringMatcher::new(vec!["abcd".into(), "bcx".into()]);
        assert_eq!(matcher.push("abcx tail").text, "a");
    }

    #[test]
    fn many_stops_sharing_prefixes_behave_like_one() {
        let stops: Vec<String> = (0..MAX_STOP_STRINGS).map(|i| format!("<end{i}>")).collect();
        let mut matcher = StopStringMatcher::new(stops);
        let mut emitted = String::new();
        for piece in ["text <en", "d", "x> more <end1", "1> never"] {
            let released = matcher.push(piece);
            emitted.push_str(&released.text);
            if released.stopped {
                break;
            }
        }
        assert_eq!(emitted, "text <endx> more ");
    }
}
