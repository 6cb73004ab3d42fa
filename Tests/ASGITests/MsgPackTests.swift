import ASGI
import Foundation
import OrderedCollections
import TestSupport
import Testing

@Suite("msgpack", .timeLimit(.minutes(2)))
struct MsgPackTests {
    /// Recorded from Python 3.11, msgpack-python 0.5.6: `msgpack.packb(value, use_bin_type=True)`.
    @Test(
        "byte-exact against Python's encoder",
        arguments: [
            (
                Cases.nested,
                "8ca474657874a8636166c3a920c2a3a3726177c406c2a301000321a5706f756e64a2c2a3a5636f756e74cd012ca86e65676174697665d0d8a3626967cf0000010000000000a5726174696fcb3ff8000000000000a3796573c3a76e6f7468696e67c0a46c69737493c4056279746573a37374729301a374776fc4057468726565a7686561646572739392c404686f7374c40b6578616d706c652e636f6d92c405782d647570c4013192c405782d647570c40132a36d617082a5696e6e6572c40200ffa664656570657281a173a178"
            ),
            (Cases.small, "81a474657874a568656c6c6f"),
            (Cases.response, "84a6737461747573ccc8a76865616465727390a7636f6e74656e74c4026869ac6d6f72655f636f6e74656e74c2"),
            (["a": .string(String(repeating: "x", count: 40))], "81a161d928" + String(repeating: "78", count: 40)),
            (
                [
                    "n": [
                        1, -1, 127, 128, -32, -33, 255, 256, 65535, 65536, .int(1 << 32), -129, -32769, .int(-(1 << 31) - 1),
                        .int(Int64.min),
                    ]
                ],
                "81a16e9f01ff7fcc80e0d0dfccffcd0100cdffffce00010000cf0000000100000000d1ff7fd2ffff7fffd3ffffffff7fffffffd38000000000000000"
            ),
            ([String(repeating: "k", count: 16): 1], "81b06b6b6b6b6b6b6b6b6b6b6b6b6b6b6b6b01"),
        ] as [(Message, String)])
    func pythonVectors(message: Message, expected: String) throws {
        #expect(hex(MsgPackEncoder.encode(message)) == expected)
        #expect(try MsgPackDecoder().decodeMessage(unhex(expected)) == message)
        #expect(MsgPackEncoder.encodedSize(message) == expected.count / 2)
    }

    @Test func sixteenKeysUseMap16() throws {
        var message = Message()
        for i in 0..<16 { message["k\(i)"] = .int(Int64(i)) }
        let expected =
            "de0010a26b3000a26b3101a26b3202a26b3303a26b3404a26b3505a26b3606a26b3707a26b3808a26b3909a36b31300aa36b31310ba36b31320ca36b31330da36b31340ea36b31350f"
        #expect(hex(MsgPackEncoder.encode(message)) == expected)
    }

    @Test func bin16ForLongBytes() {
        let encoded = MsgPackEncoder.encode(.bytes(Array(repeating: 0x79, count: 300)))
        #expect(Array(encoded.prefix(3)) == [0xc5, 0x01, 0x2c])
    }

    @Test func stringsAndBytesStayDistinct() throws {
        let message: Message = ["s": "\u{a3}", "b": .bytes(Array("\u{a3}".utf8))]
        let decoded = try MsgPackDecoder().decodeMessage(MsgPackEncoder.encode(message))
        #expect(decoded["s"] == .string("\u{a3}"))
        #expect(decoded["b"] == .bytes([0xc2, 0xa3]))
    }

    @Test func readsEveryForm() throws {
        // float32, str16/32, bin32, array16/32, map32, uint forms and negative fixints.
        let d = MsgPackDecoder()
        #expect(try d.decode([0xca, 0x3f, 0xc0, 0x00, 0x00]) == .double(1.5))
        #expect(try d.decode([0xda, 0x00, 0x01, 0x61]) == .string("a"))
        #expect(try d.decode([0xdb, 0x00, 0x00, 0x00, 0x01, 0x61]) == .string("a"))
        #expect(try d.decode([0xc6, 0x00, 0x00, 0x00, 0x01, 0x00]) == .bytes([0]))
        #expect(try d.decode([0xdc, 0x00, 0x01, 0xc0]) == .array([.null]))
        #expect(try d.decode([0xdd, 0x00, 0x00, 0x00, 0x01, 0xc3]) == .array([.bool(true)]))
        #expect(try d.decode([0xdf, 0x00, 0x00, 0x00, 0x01, 0xa1, 0x6b, 0x02]) == .map(["k": 2]))
        #expect(try d.decode([0xe0]) == .int(-32))
        #expect(try d.decode([0xcf, 0x7f, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]) == .int(Int64.max))
        #expect(try d.decode([0x81, 0xc4, 0x01, 0x6b, 0x02]) == .map(["k": 2]), "a bin key that is UTF-8 is read as a string")
    }

    @Test(
        "bad input gives a typed error",
        arguments: [
            ([0x81, 0xa1, 0x61], MsgPackError.Code.truncated),
            ([0xd9], .truncated),
            ([0xa3, 0x61], .lengthExceedsInput),
            ([0xc6, 0xff, 0xff, 0xff, 0xff], .lengthExceedsInput),  // bin32 claiming 4 GiB
            ([0xdd, 0xff, 0xff, 0xff, 0xff], .lengthExceedsInput),  // array32 claiming 4G elements
            ([0xdf, 0xff, 0xff, 0xff, 0xff, 0xc0], .lengthExceedsInput),  // map32 claiming 4G pairs
            ([0xdb, 0xff, 0xff, 0xff, 0xff, 0x61], .lengthExceedsInput),  // str32 claiming 4 GiB
            ([0xa2, 0xc3, 0x28], .invalidUTF8),
            ([0xc1], .unsupportedType),
            ([0xd4, 0x01, 0x00], .unsupportedType),
            ([0x81, 0x01, 0x02], .invalidMapKey),
            ([0xcf, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff], .integerOverflow),
            ([0xc0, 0xc0], .trailingBytes),
            ([], .truncated),
        ] as [([UInt8], MsgPackError.Code)])
    func badInput(bytes: [UInt8], code: MsgPackError.Code) {
        #expect {
            try MsgPackDecoder().decode(bytes)
        } throws: { error in
            (error as? MsgPackError)?.code == code
        }
    }

    @Test func nestingTenThousandDeepIsRejected() {
        let deepArrays = [UInt8](repeating: 0x91, count: 10_000) + [0xc0]
        let deepMaps = Array([[UInt8]](repeating: [0x81, 0xa1, 0x6b], count: 10_000).joined()) + [0xc0]
        for input in [deepArrays, deepMaps] {
            #expect {
                try MsgPackDecoder().decode(input)
            } throws: { error in
                (error as? MsgPackError)?.code == .nestingTooDeep
            }
        }
    }

    @Test func notAMapIsNotAMessage() {
        #expect(throws: MsgPackError.self) { try MsgPackDecoder().decodeMessage([0x90]) }
    }

    @Test func randomValuesRoundTrip() async throws {
        try await onOwnThread { try Self.roundTrips() }
    }

    static func roundTrips() throws {
        var rng = SplitMix(seed: 42)
        for _ in 0..<1000 {
            let value = randomValue(&rng, depth: 0)
            let encoded = MsgPackEncoder.encode(value)
            #expect(MsgPackEncoder.encodedSize(value) == encoded.count)
            #expect(try MsgPackDecoder().decode(encoded) == value)
        }
    }

    /// Thousands of random and mutated inputs: each must decode or throw MsgPackError,
    /// never crash or hang.
    @Test func randomAndMutatedInputsNeverCrash() async throws {
        try await onOwnThread { Self.mutatedInputs() }
    }

    static func mutatedInputs() {
        var rng = SplitMix(seed: 7)
        let decoder = MsgPackDecoder()
        var decoded = 0, rejected = 0, roundTripFailures = 0
        for round in 0..<20_000 {
            var input: [UInt8]
            if round % 2 == 0 {
                input = (0..<Int(rng.next() % 64)).map { _ in UInt8(truncatingIfNeeded: rng.next()) }
            } else {
                input = MsgPackEncoder.encode(randomValue(&rng, depth: 0))
                let mutations = 1 + Int(rng.next() % 4)
                for _ in 0..<mutations where !input.isEmpty {
                    let at = Int(rng.next() % UInt64(input.count))
                    switch rng.next() % 3 {
                    case 0: input[at] = UInt8(truncatingIfNeeded: rng.next())
                    case 1: input.removeSubrange(at...)
                    default: input.insert(UInt8(truncatingIfNeeded: rng.next()), at: at)
                    }
                }
            }
            let value: ASGIValue
            do {
                value = try decoder.decode(input)
            } catch {
                rejected += 1
                continue
            }
            decoded += 1
            // What decodes is a real value: encoding it again and decoding that gives it back
            // (compared as bytes, so a NaN that decoded is still equal to itself).
            let again = MsgPackEncoder.encode(value)
            if (try? decoder.decode(again)).map({ MsgPackEncoder.encode($0) }) != again {
                roundTripFailures += 1
            }
        }
        #expect(roundTripFailures == 0, "a decoded value must survive encode + decode")
        #expect(decoded > 100, "some inputs (valid prefixes, unharmed mutations) decode")
        #expect(rejected > 1000, "mutations should break most inputs")
    }
}

/// A small deterministic generator so failures reproduce.
struct SplitMix: RandomNumberGenerator {
    var state: UInt64
    init(seed: UInt64) { state = seed }
    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}

func randomValue(_ rng: inout SplitMix, depth: Int) -> ASGIValue {
    let pick = rng.next() % (depth > 3 ? 6 : 8)
    switch pick {
    case 0: return .null
    case 1: return .bool(rng.next() % 2 == 0)
    case 2:
        let shifts: [UInt64] = [0, 57, 49, 33, 1]
        return .int(Int64(bitPattern: rng.next() >> shifts[Int(rng.next() % 5)]))
    case 3: return .double(Double(Int64(bitPattern: rng.next()) % 100_000) / 7)
    case 4:
        let length = Int(rng.next() % 40)
        let scalars = ["a", "é", "£", "字", "😀", " ", "\u{0}"]
        return .string((0..<length).map { _ in scalars[Int(rng.next() % UInt64(scalars.count))] }.joined())
    case 5: return .bytes((0..<Int(rng.next() % 300)).map { _ in UInt8(truncatingIfNeeded: rng.next()) })
    case 6: return .array((0..<Int(rng.next() % 20)).map { _ in randomValue(&rng, depth: depth + 1) })
    default:
        var map = Message()
        for i in 0..<Int(rng.next() % 18) { map["k\(i)"] = randomValue(&rng, depth: depth + 1) }
        return .map(map.fields)
    }
}
