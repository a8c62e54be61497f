//! PLACEHOLDER until the chat-template branch lands (it replaces this file whole): the API the
//! server codes against, rendering nothing.

use std::path::Path;

use super::Tokenizer;

pub struct ChatTemplate;

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ChatTemplateError {
    #[error("{0}")]
    Raised(String),
    #[error("{0}")]
    Render(String),
}

impl ChatTemplate {
    pub fn load(
        _dir: &Path,
        _tokenizer: &Tokenizer,
        _override_file: Option<&Path>,
    ) -> Result<Option<Self>, ChatTemplateError> {
        Ok(None)
    }

    pub fn render(
        &self,
        messages: &[ChatMessage],
        _add_generation_prompt: bool,
    ) -> Result<String, ChatTemplateError> {
        Ok(messages.iter().map(|m| m.content.as_str()).collect())
    }

    pub fn source(&self) -> &str {
        "placeholder"
    }
}
