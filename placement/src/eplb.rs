//! Filled in by the balanced placement work.
