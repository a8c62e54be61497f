//! The request limits every API enforces, as checks that name the offending field. The gRPC and
//! the OpenAI layers differ only in field names and in how they report an [`Invalid`].

use crate::engine::detokenizer::{MAX_STOP_STRING_BYTES, MAX_STOP_STRINGS};

/// Most alternatives a client may ask for per token.
pub const MAX_LOGPROBS: u32 = 20;

/// Longest `request_id`, in bytes: it is echoed in every response message, so a long one would
/// multiply the response size.
pub const MAX_REQUEST_ID_BYTES: usize = 256;

/// Longest `cache_salt`, in bytes: a tenant id or a random token fits; it is hashed once.
pub const MAX_CACHE_SALT_BYTES: usize = 256;

/// The limits a request is validated against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestLimits {
    /// Prompt plus new tokens.
    pub max_seq_len: usize,
    pub vocab_size: usize,
    /// Tokens the whole cache pool holds: one request can never use more.
    pub cache_capacity_tokens: usize,
}

impl RequestLimits {
    /// Prompt plus new tokens one request may hold: the context limit, or less when the cache
    /// pool is smaller.
    pub fn context(&self) -> usize {
        self.max_seq_len.min(self.cache_capacity_tokens)
    }
}

/// A request that breaks a rule; the message names the field and the rule.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Invalid(pub String);

/// Checks a tokenized prompt: not empty, every id in the vocabulary, room left to generate.
/// `field` names the prompt in messages, `ids_field` its token ids (`prompt: token_ids` in gRPC,
/// `prompt` in OpenAI's API, where the ids are the prompt itself).
pub fn check_prompt(
    prompt: &[u32],
    limits: &RequestLimits,
    field: &str,
    ids_field: &str,
) -> Result<(), Invalid> {
    if prompt.is_empty() {
        return Err(Invalid(format!("{field}: no tokens")));
    }
    if let Some((index, id)) = prompt
        .iter()
        .enumerate()
        .find(|&(_, &id)| id as usize >= limits.vocab_size)
    {
        return Err(Invalid(format!(
            "{ids_field}[{index}] = {id} is outside the vocabulary of {} tokens",
            limits.vocab_size
        )));
    }
    let context = limits.context();
    if prompt.len() >= context {
        return Err(Invalid(format!(
            "{field}: {} tokens leave no room to generate within the context limit of {context} tokens",
            prompt.len()
        )));
    }
    Ok(())
}

/// New tokens for a checked prompt of `prompt_len` tokens: `requested`, or what the context
/// leaves when the client sets none. `field` names the client's limit.
pub fn max_new_tokens(
    prompt_len: usize,
    requested: Option<u32>,
    limits: &RequestLimits,
    field: &str,
) -> Result<usize, Invalid> {
    let context = limits.context();
    match requested {
        Some(0) => Err(Invalid(format!("{field} must be at least 1"))),
        Some(n) if prompt_len + n as usize > context => Err(Invalid(format!(
            "{field}: prompt ({prompt_len} tokens) + {field} ({n}) exceeds the context limit of {context} tokens"
        ))),
        Some(n) => Ok(n as usize),
        None => Ok(context.saturating_sub(prompt_len)),
    }
}

/// Stop strings: at most [`MAX_STOP_STRINGS`], none empty, none longer than
/// [`MAX_STOP_STRING_BYTES`].
pub fn check_stop_strings(stop: &[String], field: &str) -> Result<(), Invalid> {
    if stop.len() > MAX_STOP_STRINGS {
        return Err(Invalid(format!(
            "{field} has {} strings; at most {MAX_STOP_STRINGS} are allowed",
            stop.len()
        )));
    }
    if let Some(index) = stop.iter().position(String::is_empty) {
        return Err(Invalid(format!("{field}[{index}] is empty")));
    }
    if let Some((index, s)) = stop
        .iter()
        .enumerate()
        .find(|(_, s)| s.len() > MAX_STOP_STRING_BYTES)
    {
        return Err(Invalid(format!(
            "{field}[{index}] is {} bytes; at most {MAX_STOP_STRING_BYTES} are allowed",
            s.len()
        )));
    }
    Ok(())
}

/// Alternatives per token: at most [`MAX_LOGPROBS`].
pub fn check_logprobs(count: u32, field: &str) -> Result<(), Invalid> {
    if count > MAX_LOGPROBS {
        return Err(Invalid(format!(
            "{field} must be at most {MAX_LOGPROBS}, got {count}"
        )));
    }
    Ok(())
}

/// A client-chosen request id: at most [`MAX_REQUEST_ID_BYTES`].
pub fn check_request_id(id: &str, field: &str) -> Result<(), Invalid> {
    if id.len() > MAX_REQUEST_ID_BYTES {
        return Err(Invalid(format!(
            "{field} is {} bytes; at most {MAX_REQUEST_ID_BYTES} are allowed",
            id.len()
        )));
    }
    Ok(())
}

/// A cache salt: `None` for an empty or absent one, at most [`MAX_CACHE_SALT_BYTES`].
pub fn check_cache_salt(salt: Option<String>, field: &str) -> Result<Option<String>, Invalid> {
    match salt {
        Some(salt) if salt.len() > MAX_CACHE_SALT_BYTES => Err(Invalid(format!(
            "{field} is {} bytes; at most {MAX_CACHE_SALT_BYTES} are allowed",
            salt.len()
        ))),
        Some(salt) if !salt.is_empty() => Ok(Some(salt)),
        _ => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: RequestLimits = RequestLimits {
        max_seq_len: 64,
        vocab_size: 300,
        cache_capacity_tokens: 32,
    };

    #[test]
    fn the_smaller_of_context_and_cache_bounds_a_request() {
        assert_eq!(LIMITS.context(), 32);
        assert_eq!(max_new_tokens(10, None, &LIMITS, "max_tokens"), Ok(22));
        assert_eq!(max_new_tokens(10, Some(22), &LIMITS, "max_tokens"), Ok(22));
        let error = max_new_tokens(10, Some(23), &LIMITS, "max_tokens").unwrap_err();
        assert_eq!(
            error.0,
            "max_tokens: prompt (10 tokens) + max_tokens (23) exceeds the context limit of 32 tokens"
        );
        let error = check_prompt(&[1; 32], &LIMITS, "prompt", "prompt").unwrap_err();
        assert!(
            error.0.starts_with("prompt: 32 tokens leave no room"),
            "{error}"
        );
    }

    #[test]
    fn each_check_names_its_field() {
        assert_eq!(
            check_prompt(&[1, 300], &LIMITS, "prompt", "prompt")
                .unwrap_err()
                .0,
            "prompt[1] = 300 is outside the vocabulary of 300 tokens"
        );
        assert_eq!(
            check_prompt(&[], &LIMITS, "messages", "messages")
                .unwrap_err()
                .0,
            "messages: no tokens"
        );
        assert_eq!(
            max_new_tokens(1, Some(0), &LIMITS, "max_completion_tokens")
                .unwrap_err()
                .0,
            "max_completion_tokens must be at least 1"
        );
        assert_eq!(
            check_stop_strings(&["a".into(), String::new()], "stop")
                .unwrap_err()
                .0,
            "stop[1] is empty"
        );
        let many = vec!["x".to_owned(); MAX_STOP_STRINGS + 1];
        assert!(
            check_stop_strings(&many, "stop")
                .unwrap_err()
                .0
                .contains("at most")
        );
        let long = vec!["x".repeat(MAX_STOP_STRING_BYTES + 1)];
        assert!(
            check_stop_strings(&long, "stop")
                .unwrap_err()
                .0
                .starts_with("stop[0] is")
        );
        assert_eq!(
            check_logprobs(21, "top_logprobs").unwrap_err().0,
            "top_logprobs must be at most 20, got 21"
        );
        assert!(check_request_id(&"r".repeat(257), "user").is_err());
        assert_eq!(
            check_cache_salt(Some(String::new()), "cache_salt"),
            Ok(None)
        );
        assert_eq!(
            check_cache_salt(Some("t".into()), "cache_salt"),
            Ok(Some("t".to_owned()))
        );
        assert!(
            check_cache_salt(Some("s".repeat(257)), "cache_salt")
                .unwrap_err()
                .0
                .starts_with("cache_salt is 257 bytes")
        );
        assert!(check_request_id(&"r".repeat(256), "user").is_ok());
    }
}
