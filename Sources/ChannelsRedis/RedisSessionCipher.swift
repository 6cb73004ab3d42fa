import Channels
import RedisChannelLayer

extension StorageEncryption: SessionCipher {}
