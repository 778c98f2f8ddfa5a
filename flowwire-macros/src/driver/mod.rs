//! `#[driver]`: a trait of `async fn` methods becomes a call enum, a proxy and dispatch glue.

mod expand;
mod parse;

use proc_macro2::TokenStream;

use crate::ctxt::Ctxt;

/// parse → validate → expand. On error the trait is still emitted, so tools keep working.
pub fn driver(args: TokenStream, input: &TokenStream) -> TokenStream {
    let mut cx = Ctxt::default();
    let allowed: Vec<&str> = crate::options::POLICY
        .iter()
        .copied()
        .chain(["crate"])
        .collect();
    let opts = crate::options::parse("driver", args, &allowed, &mut cx);
    let item: syn::ItemTrait = match syn::parse2::<syn::Item>(input.clone()) {
        Ok(syn::Item::Trait(item)) => item,
        Ok(syn::Item::Impl(item)) if item.trait_.is_some() => {
            let krate = crate::options::krate(&opts);
            return match cx.check() {
                Ok(()) => expand::expand_impl(&item, &krate),
                Err(errors) => quote::quote!(#errors #item),
            };
        }
        _ => {
            // With the option errors, if any: each misuse is reported.
            cx.error(
                input,
                "`#[driver]` goes on a trait whose methods are `async fn name(&self, ..) -> Result<T, E>`, or on an `impl DriverTrait for Type` block",
            );
            let errors = cx.check().err();
            return quote::quote!(#errors #input);
        }
    };
    let model = parse::parse(&item, opts, &mut cx);
    match cx.check() {
        Ok(()) => expand::expand(&model),
        Err(errors) => {
            // The trait is still emitted, without the method policies this macro consumes
            // (left in, they would read as misplaced `#[driver]` attributes).
            let mut item = item.clone();
            for it in &mut item.items {
                if let syn::TraitItem::Fn(f) = it {
                    f.attrs.retain(|a| !crate::util::is_marker(a, "driver"));
                }
            }
            quote::quote!(#errors #item)
        }
    }
}

#[cfg(test)]
mod tests {
    use quote::quote;

    fn errors(input: proc_macro2::TokenStream) -> String {
        super::driver(quote!(), &input).to_string()
    }

    #[test]
    fn a_method_that_is_not_async_is_refused() {
        let out = errors(quote!(
            trait P {
                fn charge(&self, c: u64) -> Result<u8, u8>;
            }
        ));
        assert!(out.contains("driver methods are `async fn`"), "{out}");
    }

    #[test]
    fn a_borrowed_argument_is_refused_with_its_owned_type() {
        let out = errors(quote!(
            trait Mailer {
                async fn send(&self, to: &str, cc: &[String], n: &u32) -> Result<(), String>;
            }
        ));
        assert!(out.contains("write `String`"), "{out}");
        assert!(out.contains("write `Vec<String>`"), "{out}");
        assert!(out.contains("write `u32`"), "{out}");
    }

    #[test]
    fn self_by_value_is_refused() {
        let out = errors(quote!(
            trait P {
                async fn charge(self, c: u64) -> Result<u8, u8>;
            }
        ));
        assert!(out.contains("take `&self`"), "{out}");
    }

    #[test]
    fn a_method_policy_is_parsed_and_its_attribute_removed() {
        let out = errors(quote!(
            pub trait Payment {
                #[driver(retries = 0, ambiguous = "park")]
                async fn charge(&self, cents: u64) -> Result<u8, u8>;
            }
        ));
        assert!(!out.contains("compile_error"), "{out}");
        assert!(
            !out.contains("# [driver"),
            "the method attribute is consumed: {out}"
        );
        assert!(out.contains("Ambiguous :: Park"), "{out}");
    }

    #[test]
    fn a_method_policy_rejects_other_options() {
        let out = errors(quote!(
            pub trait Payment {
                #[driver(crate = "x", ambiguous = "later")]
                async fn charge(&self, cents: u64) -> Result<u8, u8>;
            }
        ));
        assert!(
            out.contains("`crate` is not allowed on `#[driver]` methods"),
            "{out}"
        );
    }

    #[test]
    fn a_valid_driver_expands_to_its_call_enum_and_proxy() {
        let out = errors(quote!(
            pub trait Payment {
                async fn charge(&self, cents: u64) -> Result<u8, u8>;
            }
        ));
        assert!(out.contains("pub enum PaymentCall"), "{out}");
        assert!(out.contains("pub struct PaymentProxy"), "{out}");
        assert!(!out.contains("compile_error"), "{out}");
    }
}
