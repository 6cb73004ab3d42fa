import ASGI
import Testing

@Suite("names and patterns", .timeLimit(.minutes(2)))
struct NamesTests {
    @Test func randomLettersAreLettersFromTheWholeAlphabet() {
        var seen = Set<Character>()
        var names = Set<String>()
        for count in [1, 10, 11, 12, 23] {
            for _ in 0..<400 {
                let name = ChannelNames.randomLetters(count)
                #expect(name.count == count)
                #expect(name.allSatisfy { $0.isASCII && $0.isLetter }, "\(name)")
                seen.formUnion(name)
                if count == 12 { names.insert(name) }
            }
        }
        #expect(seen.count == 52, "every letter, both cases, turns up: \(seen.count) seen")
        #expect(names.count == 400, "12-letter names do not repeat")
    }

    @Test(arguments: [
        "http.request", "websocket.connect", "daphne.response.AbCdEfGhIj!KlMnOpQrSt",
        "test.foo?abc", "x!", "a-b_c.d", String(repeating: "a", count: 99),
    ])
    func validChannels(name: String) throws {
        try ChannelNames.validateChannel(name)
    }

    @Test(arguments: [
        "http.request\u{a3}", String(repeating: "a", count: 110), "one?two?three",
        "four!five!six", "some+other!thing", "", "!x", "?x", "test.foo?", "sp ace",
    ])
    func invalidChannels(name: String) {
        #expect {
            try ChannelNames.validateChannel(name)
        } throws: { error in
            guard let error = error as? ChannelLayerError else { return false }
            return error.code == .invalidName && error.message.contains("'\(name)'")
        }
    }

    @Test func receiveOfProcessChannelMustEndAtBang() throws {
        try ChannelNames.validateChannel("x!c")
        #expect(throws: ChannelLayerError.self) { try ChannelNames.validateChannel("x!c", for: .receive) }
        try ChannelNames.validateChannel("x!", for: .receive)
    }

    @Test func groups() throws {
        try ChannelNames.validateGroup("chat-lobby")
        for bad in ["a!b", "a?b", "", String(repeating: "g", count: 100), "g\u{a3}"] {
            #expect(throws: ChannelLayerError.self) { try ChannelNames.validateGroup(bad) }
        }
    }

    @Test func patterns() throws {
        try ChannelNames.validatePattern("test.foo?")
        #expect(throws: ChannelLayerError.self) { try ChannelNames.validatePattern("test!") }
        #expect(throws: ChannelLayerError.self) { try ChannelNames.validatePattern("test.foo") }
    }

    @Test func nonLocalName() {
        #expect(ChannelNames.nonLocalName("a.b!cd") == "a.b!")
        #expect(ChannelNames.nonLocalName("a.b") == "a.b")
    }

    @Test func globs() {
        #expect(GlobPattern("http.*").matches("http.request"))
        #expect(!GlobPattern("http.*").matches("websocket.connect"))
        #expect(GlobPattern("*").matches(""))
        #expect(GlobPattern("a?c").matches("abc"))
        #expect(!GlobPattern("a?c").matches("ac"))
        #expect(GlobPattern("[hw]*").matches("websocket.receive"))
        #expect(!GlobPattern("[!hw]*").matches("http.request"))
        #expect(GlobPattern("*.request*").matches("http.request.body?x"))
        #expect(GlobPattern("daphne.response*!").matches("daphne.response.abc!"))
        let table = CapacityTable(defaultCapacity: 100, patterns: [("http.*", 10), ("*", 50)])
        #expect(table.capacity(for: "http.request") == 10)
        #expect(table.capacity(for: "other") == 50)
        #expect(CapacityTable(defaultCapacity: 7).capacity(for: "x") == 7)
        // The ordering wait channels' entry ends every table: configurable, and a pattern before it wins.
        #expect(CapacityTable(defaultCapacity: 100).capacity(for: "__wait__.abc") == 1000)
        #expect(CapacityTable(defaultCapacity: 500).capacity(for: "__wait__.abc") == 5000)
        #expect(CapacityTable(defaultCapacity: 100, patterns: [("__wait__.*", 20)]).capacity(for: "__wait__.abc") == 20)
        #expect(table.capacity(for: "__wait__.abc") == 50, "the catch-all '*' comes first")
        // A socket's per-order wait channels count their statistics under its one wait channel.
        #expect(CapacityTable.statisticsName("__wait__.abc.17") == "__wait__.abc")
        #expect(CapacityTable.statisticsName("__wait__.abc") == "__wait__.abc")
        #expect(CapacityTable.statisticsName("chat.messages") == "chat.messages")
    }

    @Test func typedAccessors() throws {
        let message: Message = ["path": "/", "order": 3, "body": .bytes([1])]
        #expect(try message.string("path") == "/")
        #expect(try message.int("order") == 3)
        #expect(throws: MessageError(.missingKey, key: "nope")) { try message.string("nope") }
        #expect {
            try message.string("body")
        } throws: { error in
            (error as? MessageError)?.code == .wrongType && "\(error)".contains("expected string, found bytes")
        }
    }
}
