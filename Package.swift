// swift-tools-version:6.0
import PackageDescription

let package = Package(
    name: "swift-channels",
    platforms: [.macOS(.v15)],
    products: [
        .library(name: "ASGI", targets: ["ASGI"]),
        .library(name: "RedisChannelLayer", targets: ["RedisChannelLayer"]),
        .library(name: "InterfaceServer", targets: ["InterfaceServer"]),
        .library(name: "Channels", targets: ["Channels"]),
        .library(name: "ChannelsCommand", targets: ["ChannelsCommand"]),
        .library(name: "ChannelsTesting", targets: ["ChannelsTesting"]),
        .executable(name: "chat", targets: ["ChatExample"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-collections.git", from: "1.1.0"),
        .package(url: "https://github.com/apple/swift-nio.git", from: "2.80.0"),
        .package(url: "https://github.com/apple/swift-log.git", from: "1.16.0"),
        .package(url: "https://github.com/apple/swift-argument-parser.git", from: "1.5.0"),
        .package(url: "https://github.com/apple/swift-crypto.git", "3.12.0"..<"4.0.0"),
        .package(url: "https://github.com/groue/GRDB.swift.git", from: "7.0.0"),
    ],
    targets: [
        .systemLibrary(
            name: "CHiredis",
            pkgConfig: "hiredis",
            providers: [.apt(["libhiredis-dev"])]
        ),
        .target(
            name: "ASGI",
            dependencies: [
                .product(name: "OrderedCollections", package: "swift-collections"),
                .product(name: "DequeModule", package: "swift-collections"),
                .product(name: "Logging", package: "swift-log"),
            ]
        ),
        .target(
            name: "RedisChannelLayer",
            dependencies: [
                "ASGI",
                "CHiredis",
                .product(name: "DequeModule", package: "swift-collections"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "Logging", package: "swift-log"),
            ]
        ),
        .target(
            name: "InterfaceServer",
            dependencies: [
                "ASGI",
                .product(name: "DequeModule", package: "swift-collections"),
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOHTTP1", package: "swift-nio"),
                .product(name: "NIOWebSocket", package: "swift-nio"),
                .product(name: "Logging", package: "swift-log"),
            ]
        ),
        .target(
            name: "Channels",
            dependencies: [
                "ASGI", "RedisChannelLayer",
                .product(name: "DequeModule", package: "swift-collections"),
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "Crypto", package: "swift-crypto"),
                .product(name: "_CryptoExtras", package: "swift-crypto"),
                .product(name: "Logging", package: "swift-log"),
            ]
        ),
        .target(
            name: "ChannelsTesting",
            dependencies: ["ASGI", "Channels", .product(name: "Logging", package: "swift-log")]
        ),
        .target(
            name: "ChannelsCommand",
            dependencies: [
                "ASGI", "Channels", "InterfaceServer", "RedisChannelLayer",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
            ]
        ),
        .executableTarget(
            name: "ChatExample",
            dependencies: ["ASGI", "Channels", "ChannelsCommand", .product(name: "GRDB", package: "GRDB.swift")]
        ),
        .executableTarget(
            name: "PeerChat",
            dependencies: ["ASGI", "Channels", "ChannelsCommand"]
        ),
        .executableTarget(
            name: "ChannelsBench",
            dependencies: [
                "ASGI", "RedisChannelLayer",
                .product(name: "DequeModule", package: "swift-collections"),
                .product(name: "NIOCore", package: "swift-nio"), .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOHTTP1", package: "swift-nio"), .product(name: "NIOWebSocket", package: "swift-nio"),
            ]
        ),
        .testTarget(name: "ChannelsTests", dependencies: ["ASGI", "Channels", "ChannelsTesting", "RedisChannelLayer"]),
        .testTarget(name: "InterfaceServerTests", dependencies: [
            "ASGI", "Channels", "InterfaceServer",
            .product(name: "NIOCore", package: "swift-nio"), .product(name: "NIOPosix", package: "swift-nio"),
            .product(name: "NIOHTTP1", package: "swift-nio"), .product(name: "NIOWebSocket", package: "swift-nio"),
        ]),
        .testTarget(name: "ChannelLayerTests", dependencies: [
            "ASGI", "CHiredis", "RedisChannelLayer",
            .product(name: "NIOCore", package: "swift-nio"), .product(name: "NIOPosix", package: "swift-nio"),
        ]),
    ],
    swiftLanguageModes: [.v6]
)
