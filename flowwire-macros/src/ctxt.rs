//! Error accumulation: every problem in an item is reported at once, each at its token.
//! A context dropped without [`Ctxt::check`] panics (serde's `Ctxt` does the same), so no
//! path of a macro can lose the errors it recorded.

use proc_macro2::TokenStream;
use quote::ToTokens;

/// Collects errors; [`Ctxt::check`] must be called to turn them into output.
pub struct Ctxt {
    /// `None` once checked.
    errors: Option<Vec<syn::Error>>,
}

impl Default for Ctxt {
    fn default() -> Self {
        Self {
            errors: Some(Vec::new()),
        }
    }
}

impl Drop for Ctxt {
    fn drop(&mut self) {
        assert!(
            self.errors.is_none() || std::thread::panicking(),
            "a macro dropped its error context without checking it"
        );
    }
}

impl Ctxt {
    fn errors(&mut self) -> &mut Vec<syn::Error> {
        self.errors
            .as_mut()
            .expect("errors are recorded before the context is checked")
    }

    /// Records an error spanning `tokens`.
    pub fn error(&mut self, tokens: impl ToTokens, msg: impl std::fmt::Display) {
        self.errors()
            .push(syn::Error::new_spanned(tokens.into_token_stream(), msg));
    }

    /// Records a parse error.
    pub fn syn(&mut self, e: syn::Error) {
        self.errors().push(e);
    }

    /// `Ok` if no error was recorded, else all of them as `compile_error!`s.
    pub fn check(mut self) -> Result<(), TokenStream> {
        let errors = self.errors.take().unwrap_or_default();
        if errors.is_empty() {
            return Ok(());
        }
        Err(errors.iter().map(syn::Error::to_compile_error).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::Ctxt;

    #[test]
    fn every_error_recorded_comes_out_of_check() {
        let mut cx = Ctxt::default();
        cx.error(quote::quote!(a), "first");
        cx.error(quote::quote!(b), "second");
        let out = cx.check().unwrap_err().to_string();
        assert!(out.contains("first") && out.contains("second"), "{out}");
        assert!(Ctxt::default().check().is_ok());
    }

    #[test]
    #[should_panic(expected = "without checking it")]
    fn a_context_dropped_unchecked_panics() {
        let mut cx = Ctxt::default();
        cx.error(quote::quote!(a), "lost");
        drop(cx);
    }
}
