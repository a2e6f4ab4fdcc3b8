//! The chunk server: see ARCHITECTURE.md.
