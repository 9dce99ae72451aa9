"""Sessions arriving by handoff (session_handoff_in) must never silently overwrite what this
device already holds under the same id: a different history is imported beside it under a new
id (the ack says renamed_from); a continuation of it (a replay, a round trip) replaces it."""

from __future__ import annotations

import json

from tests.control_helpers import control_plane, linked_device, url


async def test_a_foreign_session_with_a_local_id_is_imported_beside_it(tmp_path):
    async with control_plane() as plane, linked_device(tmp_path, url(plane)) as (app, _):
        await plane.wait_connected("dev-a")
        mine = await app.conversation.reply_text("My cat is called Tom.")
        local = json.loads(json.dumps(await app.store.run(app.store.export_session,
                                                           mine.session_id)))
        forged = {**local, "turns": [{**t, "content": "I have no cat."} for t in local["turns"]]}
        ack = await plane.wait_ack(await plane.send("dev-a", "session_handoff_in", {
            "session": forged, "from_device_id": "stranger", "notify_user": False}))
        assert ack["ok"] and ack["renamed_from"] == mine.session_id
        assert ack["session_id"] != mine.session_id
        kept = await app.store.run(app.store.export_session, mine.session_id)
        assert kept["turns"] == local["turns"]  # the local history is as it was
        assert app.conversation.active_session_id == ack["session_id"]  # carries on the import


async def test_a_session_coming_back_grown_continues_under_its_id(tmp_path):
    async with control_plane() as plane, linked_device(tmp_path, url(plane)) as (app, _):
        await plane.wait_connected("dev-a")
        mine = await app.conversation.reply_text("Remind me about the dentist.")
        doc = json.loads(json.dumps(await app.store.run(app.store.export_session,
                                                         mine.session_id)))
        grown = {**doc, "turns": [*doc["turns"],
                                  {"turn_id": "t-elsewhere", "role": "user", "content": "And?"},
                                  {"turn_id": "t-elsewhere", "role": "assistant",
                                   "content": "Tuesday."}]}
        for _ in range(2):  # and a replay of the same export under a new command id
            ack = await plane.wait_ack(await plane.send("dev-a", "session_handoff_in", {
                "session": grown, "notify_user": False}))
            assert ack["ok"] and ack["session_id"] == mine.session_id
            assert "renamed_from" not in ack and ack["turns"] == 4
