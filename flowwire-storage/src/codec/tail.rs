//! How postcard's output is appended to a `Vec`: the flavor every envelope and raw
//! encoding writes through (`encode_raw`, `encode_owned`, …), and the short copy the
//! rope's own flavor shares. It changes nothing of the bytes, only how they are appended
//! (a call of `memcpy` for a one-byte varint costs more than the varint).

/// Postcard's output appended to a `Vec`. Most of what postcard writes is one-byte varints
/// and tags: those are pushed ([`push_small`]); anything longer is copied.
pub(super) struct Tail<'a>(pub(super) &'a mut Vec<u8>);

impl postcard::ser_flavors::Flavor for Tail<'_> {
    type Output = ();

    fn try_push(&mut self, data: u8) -> postcard::Result<()> {
        self.0.push(data);
        Ok(())
    }

    fn try_extend(&mut self, data: &[u8]) -> postcard::Result<()> {
        push_small(self.0, data);
        Ok(())
    }

    fn finalize(self) -> postcard::Result<()> {
        Ok(())
    }
}

/// Postcard's bytes for `value`, appended to `out` as the envelopes append them.
pub(crate) fn append_postcard<T: serde::Serialize + ?Sized>(
    value: &T,
    out: &mut Vec<u8>,
) -> postcard::Result<()> {
    postcard::serialize_with_flavor(value, Tail(out))
}

/// Appends `data` to `out`: one byte (a one-byte varint, a tag) pushed, more copied.
#[inline]
pub(crate) fn push_small(out: &mut Vec<u8>, data: &[u8]) {
    match data {
        [b] => out.push(*b),
        _ => out.extend_from_slice(data),
    }
}

#[cfg(test)]
mod tests {
    use super::super::encode_raw;
    use super::push_small;

    /// Every length from empty to past the short copies appends exactly its bytes, after
    /// what was there.
    #[test]
    fn a_short_copy_appends_exactly_its_bytes_at_every_length() {
        let data: Vec<u8> = (1..=40u8).collect();
        for n in 0..=data.len() {
            let mut out = b"head".to_vec();
            push_small(&mut out, &data[..n]);
            assert_eq!(&out[..4], b"head", "length {n}");
            assert_eq!(&out[4..], &data[..n], "length {n}");
        }
    }

    /// Stored bytes do not depend on how they were appended: what `encode_raw` writes is
    /// what postcard writes on its own, for one-byte and longer varints, signed ones,
    /// strings, byte strings short and long, options, enums and nested structures.
    #[test]
    fn values_are_appended_byte_for_byte_as_postcard_writes_them() {
        #[derive(serde::Serialize)]
        enum Shape {
            Unit,
            Tuple(u8, i64),
            Named { name: String, bytes: Vec<u8> },
        }
        #[derive(serde::Serialize)]
        struct Sample {
            small: u64,
            wide: u64,
            signed: i32,
            flag: bool,
            text: String,
            blob: Vec<u8>,
            maybe: Option<u16>,
            shapes: Vec<Shape>,
            float: f64,
        }
        for n in [0u64, 1, 127, 128, 300, 1 << 35, u64::MAX] {
            let sample = Sample {
                small: n % 100,
                wide: n,
                signed: -(n as i32),
                flag: n % 2 == 0,
                text: "é".repeat((n % 70) as usize),
                blob: (0..(n % 5_000) as usize).map(|i| i as u8).collect(),
                maybe: (n % 3 != 0).then_some(n as u16),
                shapes: vec![
                    Shape::Unit,
                    Shape::Tuple(n as u8, n.cast_signed().wrapping_neg()),
                    Shape::Named {
                        name: format!("shape-{n}"),
                        bytes: vec![7; (n % 300) as usize],
                    },
                ],
                float: f64::from((n % 1_000) as u32) / 3.0,
            };
            let mut appended = b"kept".to_vec();
            encode_raw(&sample, &mut appended).unwrap();
            let expected = postcard::to_allocvec(&sample).unwrap();
            assert_eq!(&appended[..4], b"kept", "for {n}");
            assert_eq!(&appended[4..], &expected[..], "for {n}");
        }
    }
}
