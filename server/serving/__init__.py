"""The use-cases, one entry each, called by the HTTP routes and the Batch API worker alike:
images, chat, and the accounting both end with."""

from __future__ import annotations

from dataclasses import dataclass

from server.config import Settings
from server.media.budget import PixelBudget
from server.routing.dispatch import Dispatcher
from server.serving.accounting import Accounting
from server.serving.chat import ChatServing
from server.serving.images import ImageServing
from server.store.quotas import Quotas


@dataclass(frozen=True)
class Serving:
    images: ImageServing
    chat: ChatServing
    accounting: Accounting

    @staticmethod
    def build(settings: Settings, dispatcher: Dispatcher, quotas: Quotas,
              pixels: PixelBudget | None, *, chat_enabled: bool) -> Serving:
        accounting = Accounting(quotas, dispatcher.record)
        return Serving(ImageServing(settings, dispatcher, accounting, pixels),
                       ChatServing(settings, dispatcher, accounting, pixels,
                                   enabled=chat_enabled),
                       accounting)
