import asyncio

from tests.conftest import fake_app
from tests.fakes import BLOCK, FakeMic, speech_block, wake_block


async def test_voice_turn_with_fakes_speaks_the_reply(settings):
    mic = FakeMic([BLOCK] * 5 + [wake_block()] + [speech_block()] * 20 + [BLOCK] * 40)
    app = fake_app(settings, source=mic)
    async with asyncio.timeout(5):
        await app.start()
        await app.voice.run()
        await app.voice.wait_idle()
    assert app.sink.played, "nothing was spoken"
    await app.aclose()
