import Channels
import Foundation
import GRDB

/// A chat message as stored (the seed's "Models" step).
struct ChatMessage: Codable, Sendable, FetchableRecord, MutablePersistableRecord {
    static let databaseTableName = "chat_message"
    var id: Int64?
    var room: String
    var username: String
    var text: String
    var createdAt: Double

    mutating func didInsert(_ inserted: InsertionSuccess) { id = inserted.rowID }

    var json: [String: Any] {
        ["id": id ?? 0, "room": room, "user": username, "text": text, "at": createdAt]
    }

    /// The message as the page gets it (`type`: "message", "mention", or none in a history).
    func event(_ type: String? = nil) -> ChatEvent {
        ChatEvent(at: createdAt, id: id ?? 0, room: room, text: text, type: type, user: username)
    }
}

/// A message as JSON for the page, the same bytes as ``ChatMessage/json`` through
/// `JSONSerialization` with sorted keys, encoded with `JSONEncoder` instead (a tenth of the cost:
/// the dictionary's bridging and sorting were a tenth of a worker's time per chat message).
struct ChatEvent: Encodable, Sendable {
    let at: Double
    let id: Int64
    let room: String
    let text: String
    let type: String?
    let user: String

    /// Sorted keys, as ``ChatConsumers/json(_:)`` writes them.
    static func encoder() -> JSONEncoder {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys]
        return encoder
    }

    /// The JSON text of `value`.
    static func text(_ value: some Encodable) -> String {
        String(decoding: (try? encoder().encode(value)) ?? Data("{}".utf8), as: UTF8.self)
    }
}

/// The first frame a socket gets: the room's recent history.
struct HistoryFrame: Encodable, Sendable {
    let messages: [ChatEvent]
    let room: String
    let type = "history"
    /// The signed-in user's name; `null` for a guest.
    let user: String?

    enum CodingKeys: String, CodingKey { case messages, room, type, user }

    func encode(to encoder: any Encoder) throws {
        var container = encoder.container(keyedBy: CodingKeys.self)
        try container.encode(messages, forKey: .messages)
        try container.encode(room, forKey: .room)
        try container.encode(type, forKey: .type)
        if let user { try container.encode(user, forKey: .user) } else { try container.encodeNil(forKey: .user) }
    }
}

/// An account: a user name and a PBKDF2 hash of its password (never the password).
struct Account: Codable, Sendable, FetchableRecord, MutablePersistableRecord {
    static let databaseTableName = "account"
    var id: Int64?
    var username: String
    var passwordHash: String
    var createdAt: Double

    mutating func didInsert(_ inserted: InsertionSuccess) { id = inserted.rowID }
}

/// Why the chat database could not be opened.
struct ChatDatabaseError: Error, CustomStringConvertible {
    let description: String
}

/// The app's SQLite database, shared by every process on the machine (WAL mode, with a busy
/// timeout so a server and several workers can write at once). Path: `CHAT_DATABASE`, by
/// default `chat.sqlite3` in the working directory.
final class ChatDatabase: Sendable {
    let pool: DatabasePool
    let path: String

    /// The database at `CHAT_DATABASE`, opened on first use; an error (a missing directory, a
    /// file that is not a database, no permission) is thrown to whoever asks, never a crash.
    /// `runserver` and `runworker` ask before they start (`main.swift`) and stop with that error.
    static var shared: ChatDatabase {
        get throws(ChatDatabaseError) { try opened.get() }
    }
    static let path = ProcessInfo.processInfo.environment["CHAT_DATABASE"] ?? "chat.sqlite3"
    private static let opened: Result<ChatDatabase, ChatDatabaseError> = {
        do {
            return .success(try ChatDatabase(path: path))
        } catch {
            return .failure(ChatDatabaseError(description: "cannot open the chat database at \(path): \(error)"))
        }
    }()

    init(path: String) throws {
        self.path = path
        var configuration = Configuration()
        configuration.busyMode = .timeout(10)
        // WAL (the pool's mode) with `synchronous = NORMAL`: a commit is not synced to disk
        // on its own (the WAL is at checkpoints). A crashed process loses nothing committed; a
        // power cut may lose the last commits. Saves a sync per posted message.
        configuration.prepareDatabase { db in try db.execute(sql: "PRAGMA synchronous = NORMAL") }
        // Processes started together (a server and its workers) may open a fresh file at once:
        // switching it to WAL takes a lock the busy timeout does not wait for, and the loser of
        // that race is told "database is locked". It tries again, a little later each time.
        var opening = 1
        while true {
            do {
                pool = try DatabasePool(path: path, configuration: configuration)
                break
            } catch let error as DatabaseError where error.resultCode == .SQLITE_BUSY && opening < 10 {
                opening += 1
                Thread.sleep(forTimeInterval: 0.05 * Double(opening))
            }
        }
        var migrator = DatabaseMigrator()
        migrator.registerMigration("v1") { db in
            try db.create(table: Account.databaseTableName, ifNotExists: true) { t in
                t.autoIncrementedPrimaryKey("id")
                t.column("username", .text).notNull().unique()
                t.column("passwordHash", .text).notNull()
                t.column("createdAt", .double).notNull()
            }
            try db.create(table: ChatMessage.databaseTableName, ifNotExists: true) { t in
                t.autoIncrementedPrimaryKey("id")
                t.column("room", .text).notNull().indexed()
                t.column("username", .text).notNull()
                t.column("text", .text).notNull()
                t.column("createdAt", .double).notNull()
            }
        }
        // Several processes (workers started together) may open a fresh file at once: the one
        // that loses the race finds the migration applied (or half-applied by the winner's
        // transaction) and fails; it then reads the migration table again.
        var attempt = 1
        while true {
            do {
                try migrator.migrate(pool)
                break
            } catch {
                guard attempt < 5 else { throw error }
                attempt += 1
                Thread.sleep(forTimeInterval: 0.05 * Double(attempt))
            }
        }
        // A file this user may read but not write (made by root, say, and served by a service
        // user) opens, and its migrations are already applied: without a write here, the server
        // would start and every posted message fail. Rewriting the header's user version is a
        // write that changes nothing.
        try pool.write { db in
            let version = try Int.fetchOne(db, sql: "PRAGMA user_version") ?? 0
            try db.execute(sql: "PRAGMA user_version = \(version)")
        }
    }

    /// One `INSERT` on its own (SQLite commits a single statement by itself): no `BEGIN` and
    /// `COMMIT` around it, a fifth of a save's time in a worker's profile.
    func save(_ message: ChatMessage) async throws -> ChatMessage {
        try await pool.writeWithoutTransaction { db in
            var message = message
            try message.insert(db)
            return message
        }
    }

    func message(id: Int64) async throws -> ChatMessage? {
        try await pool.read { db in try ChatMessage.fetchOne(db, key: id) }
    }

    /// The message with its new text, or nil when there is none.
    func updateText(id: Int64, text: String) async throws -> ChatMessage? {
        try await pool.write { db in
            guard var message = try ChatMessage.fetchOne(db, key: id) else { return nil }
            message.text = text
            try message.update(db)
            return message
        }
    }

    /// The message as it was, or nil when there was none.
    func deleteMessage(id: Int64) async throws -> ChatMessage? {
        try await pool.write { db in
            guard let message = try ChatMessage.fetchOne(db, key: id) else { return nil }
            try message.delete(db)
            return message
        }
    }

    /// The room's latest `limit` messages, oldest first.
    func history(room: String, limit: Int = 50) async throws -> [ChatMessage] {
        try await pool.read { db in
            try ChatMessage.filter(Column("room") == room).order(Column("id").desc).limit(limit).fetchAll(db).reversed()
        }
    }

    func account(named username: String) async throws -> Account? {
        try await pool.read { db in try Account.filter(Column("username") == username).fetchOne(db) }
    }

    func account(id: Int64) async throws -> Account? {
        try await pool.read { db in try Account.fetchOne(db, key: id) }
    }

    /// Creates an account with an already hashed password; nil if the name is taken (by a
    /// concurrent sign-up too).
    func createAccount(username: String, passwordHash hash: String) async throws -> Account? {
        try await pool.write { db in
            if try Account.filter(Column("username") == username).fetchCount(db) > 0 { return nil }
            var account = Account(id: nil, username: username, passwordHash: hash, createdAt: Date().timeIntervalSince1970)
            try account.insert(db)
            return account
        }
    }
}

/// Users for the session wrappers, loaded from the accounts table.
struct ChatUsers: UserProvider {
    func user(id: String) async throws -> User? {
        guard let number = Int64(id), let account = try await ChatDatabase.shared.account(id: number) else { return nil }
        return User(id: id, username: account.username)
    }
}
