//! Error accumulation: every problem in an item is reported at once, each at its token.

use proc_macro2::TokenStream;
use quote::ToTokens;

/// Collects errors; [`Ctxt::check`] must be called to turn them into output.
#[derive(Default)]
pub struct Ctxt {
    errors: Vec<syn::Error>,
}

impl Ctxt {
    /// Records an error spanning `tokens`.
    pub fn error(&mut self, tokens: impl ToTokens, msg: impl std::fmt::Display) {
        self.errors
            .push(syn::Error::new_spanned(tokens.into_token_stream(), msg));
    }

    /// Records a parse error.
    pub fn syn(&mut self, e: syn::Error) {
        self.errors.push(e);
    }

    /// `Ok` if no error was recorded, else all of them as `compile_error!`s.
    pub fn check(self) -> Result<(), TokenStream> {
        if self.errors.is_empty() {
            return Ok(());
        }
        Err(self
            .errors
            .iter()
            .map(syn::Error::to_compile_error)
            .collect())
    }
}
