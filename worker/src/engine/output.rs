//! From a sampled token to what the client sees: the finish rules, and each request's output
//! processor (incremental detokenization with stop strings held back and cut).

use super::codec::TokenCodec;
use super::detokenizer::{IncrementalDecoder, StopStringMatcher};
use super::request::{FinishReason, GenerationRequest};

/// The finish rule of end tokens: the model's EOS (unless the request ignores it) and the
/// request's own stop token ids. An end token's text is never part of the output.
pub fn end_token_reason(
    token: u32,
    request: &GenerationRequest,
    eos_token_ids: &[u32],
) -> Option<FinishReason> {
    if !request.ignore_eos && eos_token_ids.contains(&token) {
        Some(FinishReason::Eos)
    } else if request.stop_token_ids.contains(&token) {
        Some(FinishReason::Stop)
    } else {
        None
    }
}

/// The finish rule of length: `max_tokens` generated, or the sequence (prompt and output) at the
/// context limit.
pub fn reached_length(
    generated: usize,
    max_tokens: usize,
    sequence_len: usize,
    max_seq_len: usize,
) -> bool {
    generated >= max_tokens || sequence_len >= max_seq_len
}

/// What one sampled token adds to a request's stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenOutput {
    /// Text that may be sent now (whole characters, never part of a stop string).
    pub text: String,
    /// Set when this token ends the generation.
    pub finish: Option<FinishReason>,
}

/// One request's text stream: turns each sampled token into released text and applies the
/// finish rules in order (end token, stop string, length).
#[derive(Debug, Clone)]
pub struct OutputProcessor {
    decoder: IncrementalDecoder,
    stops: StopStringMatcher,
}

impl OutputProcessor {
    /// A processor for a request whose first `prompt_len` tokens are the prompt.
    pub fn new(prompt_len: usize, stop: Vec<String>) -> Self {
        Self {
            decoder: IncrementalDecoder::new(prompt_len),
            stops: StopStringMatcher::new(stop),
        }
    }

    /// Handles the token just appended to `tokens` (prompt and output so far).
    pub fn push_token(
        &mut self,
        codec: &dyn TokenCodec,
        request: &GenerationRequest,
        eos_token_ids: &[u32],
        tokens: &[u32],
        max_seq_len: usize,
    ) -> TokenOutput {
        let token = *tokens.last().expect("a token was just appended");
        let mut output = TokenOutput {
            text: String::new(),
            finish: end_token_reason(token, request, eos_token_ids),
        };
        if output.finish.is_none() {
            match self.decoder.step(codec, tokens) {
                Ok(delta) => {
                    let released = self.stops.push(&delta);
                    output.text = released.text;
                    if released.stopped {
                        output.finish = Some(FinishReason::Stop);
                    }
                }
                Err(error) => {
                    tracing::warn!(%error, token, "detokenizing failed; no text for this token")
                }
            }
        }
        let generated = tokens.len() - request.prompt.len();
        if output.finish.is_none()
            && reached_length(generated, request.max_tokens, tokens.len(), max_seq_len)
        {
            output.finish = Some(FinishReason::Length);
        }
        output
    }

    /// Text held back when the generation ends for any other reason than a stop: an incomplete
    /// last character, and text held for a possible stop string. `tokens` are all the ids so far.
    pub fn flush(
        &mut self,
        codec: &dyn TokenCodec,
        tokens: &[u32],
        reason: FinishReason,
    ) -> String {
        if reason == FinishReason::Stop {
            return String::new();
        }
        let mut text = match self.decoder.finish(codec, tokens) {
            // A stop string the tail completes still cuts the text there.
            Ok(tail) => self.stops.push(&tail).text,
            Err(error) => {
                tracing::warn!(%error, "detokenizing the end failed; its text is dropped");
                String::new()
            }
        };
        text.push_str(&self.stops.flush());
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::codec::tests::ByteCodec;
    use crate::engine::sampler::SamplingParams;

    const EOS: u32 = 256;

    fn request(prompt: &str, max_tokens: usize) -> GenerationRequest {
        GenerationRequest::of_bytes(prompt.as_bytes(), max_tokens, SamplingParams::default())
    }

    /// Feeds `output` byte by byte; returns the released text and the finish of the last token.
    fn run(
        request: &GenerationRequest,
        output: &[u32],
        max_seq_len: usize,
    ) -> (String, Vec<Option<FinishReason>>) {
        let mut processor = OutputProcessor::new(request.prompt.len(), request.stop.clone());
        let mut tokens = request.prompt.clone();
        let mut text = String::new();
        let mut finishes = Vec::new();
        for &token in output {
            tokens.push(token);
            let step = processor.push_token(&ByteCodec, request, &[EOS], &tokens, max_seq_len);
            text.push_str(&step.text);
            finishes.push(step.finish);
            if let Some(reason) = step.finish {
                text.push_str(&processor.flush(&ByteCodec, &tokens, reason));
                break;
            }
        }
        (text, finishes)
    }

    fn bytes(text: &str) -> Vec<u32> {
        text.bytes().map(u32::from).collect()
    }

    #[test]
    fn an_incomplete_last_character_is_released_at_the_end_as_decoding_shows_it() {
        // "é" is two bytes; the output ends after the first, then at EOS or the length limit.
        let first_byte = u32::from("é".as_bytes()[0]);
        let (text, _) = run(&request("p", 10), &[b'a'.into(), first_byte, EOS], 100);
        assert_eq!(text, "a\u{FFFD}");
        let (text, _) = run(&request("p", 2), &[b'a'.into(), first_byte], 100);
        assert_eq!(text, "a\u{FFFD}");
        // Whole characters are not repeated by the flush.
        let (text, _) = run(
            &request("p", 10),
            &bytes("é!").into_iter().chain([EOS]).collect::<Vec<_>>(),
            100,
        );
        assert_eq!(text, "é!");
    }

    #[test]
    fn eos_ends_the_generation_unless_ignored() {
        let req = request("p", 10);
        assert_eq!(end_token_reason(EOS, &req, &[EOS]), Some(FinishReason::Eos));
        assert_eq!(end_token_reason(b'a'.into(), &req, &[EOS]), None);
        let ignoring = GenerationRequest {
            ignore_eos: true,
            ..request("p", 10)
        };
        assert_eq!(end_token_reason(EOS, &ignoring, &[EOS]), None);
    }

    #[test]
    fn stop_token_ids_stop_even_when_eos_is_ignored() {
        let req = GenerationRequest {
            ignore_eos: true,
            stop_token_ids: vec![7, EOS],
            ..request("p", 10)
        };
        assert_eq!(end_token_reason(7, &req, &[EOS]), Some(FinishReason::Stop));
        assert_eq!(
            end_token_reason(EOS, &req, &[EOS]),
            Some(FinishReason::Stop)
        );
    }

    #[test]
    fn length_counts_output_tokens_and_the_context() {
        assert!(!reached_length(3, 4, 10, 100));
        assert!(reached_length(4, 4, 10, 100));
        assert!(reached_length(1, 4, 100, 100));
    }

    #[test]
    fn an_end_token_adds_no_text_and_releases_what_was_held() {
        let req = GenerationRequest {
            stop: vec!["xyz".into()],
            ..request("p", 10)
        };
        // "x" is held as the start of "xyz"; EOS ends the generation and releases it.
        let (text, finishes) = run(&req, &[b'a'.into(), b'x'.into(), EOS], 100);
        assert_eq!(text, "ax");
        assert_eq!(finishes, vec![None, None, Some(FinishReason::Eos)]);
    }

    #[test]
    fn a_stop_string_cuts_the_text_before_it() {
        let req = GenerationRequest {
            stop: vec!["cd".into()],
            ..request("p", 10)
        };
        let (text, finishes) = run(&req, &bytes("abcdef"), 100);
        assert_eq!(text, "ab");
        assert_eq!(finishes.last(), Some(&Some(FinishReason::Stop)));
        assert_eq!(finishes.len(), 4);
    }

    #[test]
    fn length_ends_at_max_tokens_or_the_context_limit() {
        let (text, finishes) = run(&request("p", 3), &bytes("abcdef"), 100);
        assert_eq!((text.as_str(), finishes.len()), ("abc", 3));
        assert_eq!(finishes.last(), Some(&Some(FinishReason::Length)));
        // Prompt of 1 + 2 tokens reaches a context of 3.
        let (text, finishes) = run(&request("p", 10), &bytes("abcdef"), 3);
        assert_eq!((text.as_str(), finishes.len()), ("ab", 2));
    }
}
