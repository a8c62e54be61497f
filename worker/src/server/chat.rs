//! A conversation -> prompt token ids, the same way for gRPC and OpenAI's API: the roles checked,
//! the chat template rendered, the text tokenized as transformers' `apply_chat_template` does.

use crate::engine::codec::TokenCodec;
use crate::model::chat_template::{ChatMessage, ChatTemplate, ChatTemplateError};
use crate::server::validate::Invalid;

/// Roles a template is given.
pub const CHAT_ROLES: [&str; 3] = ["system", "user", "assistant"];

/// A rendered conversation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatPrompt {
    pub text: String,
    pub ids: Vec<u32>,
}

/// Renders `messages` (whose field in the request is `field`) with `template` and tokenizes the
/// result without added special tokens: the template writes BOS itself.
pub fn render_conversation(
    template: Option<&ChatTemplate>,
    model: &str,
    messages: &[ChatMessage],
    add_generation_prompt: bool,
    codec: &dyn TokenCodec,
    field: &str,
) -> Result<ChatPrompt, Invalid> {
    let Some(template) = template else {
        return Err(Invalid(format!(
            "{field}: the model `{model}` has no chat template (no chat_template in tokenizer_config.json, no chat_template.jinja): start the worker with --chat-template FILE, or send a plain prompt (gRPC `text`, OpenAI `/v1/completions`)"
        )));
    };
    if messages.is_empty() {
        return Err(Invalid(format!(
            "{field}: at least one message is required"
        )));
    }
    if let Some((index, message)) = messages
        .iter()
        .enumerate()
        .find(|(_, m)| !CHAT_ROLES.contains(&m.role.as_str()))
    {
        return Err(Invalid(format!(
            "{field}[{index}].role '{}' is not one of {}",
            message.role,
            CHAT_ROLES.join(", ")
        )));
    }
    let text = template
        .render(messages, add_generation_prompt)
        .map_err(|error| match error {
            ChatTemplateError::Raised { message, .. } => Invalid(format!(
                "{field}: the chat template refused the conversation: {message}"
            )),
            other => Invalid(format!("{field}: the chat template failed: {other}")),
        })?;
    let ids = codec.encode(&text, false).map_err(|e| {
        Invalid(format!(
            "{field}: the rendered conversation could not be tokenized: {e}"
        ))
    })?;
    Ok(ChatPrompt { text, ids })
}
