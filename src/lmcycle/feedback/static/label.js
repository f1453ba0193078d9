// The labeling page's ranking board. The server renders every card, input and message; this script only moves
// cards between rank groups and keeps each card's rank input in step, so that the form it submits is the same
// with or without it. It builds no markup from data (messages are set with textContent).
"use strict";

(function () {
  const form = document.getElementById("label-form");
  if (!form) {
    return; // the login, admin and "nothing left" pages have no board
  }
  document.documentElement.classList.add("js");
  const k = Number(form.dataset.k);
  const cards = Array.from(form.querySelectorAll(".card"));
  const message = document.getElementById("form-message");
  const reason = document.getElementById("reason");
  let dragged = null;

  function rankInput(card) {
    return card.querySelector(".rank-input");
  }

  function rankOf(card) {
    const value = Number(rankInput(card).value);
    return Number.isInteger(value) && value >= 1 && value <= k ? value : null;
  }

  function place(card) {
    const rank = rankOf(card);
    const group = document.getElementById(rank === null ? "unranked" : "rank-group-" + rank);
    group.querySelector(".drop").appendChild(card);
  }

  function setRank(card, rank, refocus) {
    rankInput(card).value = rank === null ? "" : String(rank);
    place(card);
    if (refocus) {
      card.focus(); // moving a node drops its focus
    }
    say("");
  }

  function say(text) {
    message.textContent = text;
    message.hidden = text === "";
  }

  cards.forEach(function (card, i) {
    place(card); // ranks typed before a failed submission come back in their groups
    rankInput(card).addEventListener("change", function () {
      place(card);
    });
    card.addEventListener("keydown", function (event) {
      if (event.target !== card) {
        return; // typing in the card's inputs is typing
      }
      const rank = rankOf(card);
      let handled = true;
      if (/^[1-9]$/.test(event.key) && Number(event.key) <= k) {
        setRank(card, Number(event.key), true);
      } else if (event.key === "0" || event.key === "Delete" || event.key === "Backspace") {
        setRank(card, null, true);
      } else if (event.key === "ArrowUp") {
        setRank(card, rank === null ? k : Math.max(1, rank - 1), true);
      } else if (event.key === "ArrowDown") {
        setRank(card, rank === null || rank >= k ? null : rank + 1, true);
      } else if (event.key === "ArrowLeft" || event.key === "ArrowRight") {
        const next = cards[(i + (event.key === "ArrowLeft" ? cards.length - 1 : 1)) % cards.length];
        next.focus();
      } else {
        handled = false;
      }
      if (handled) {
        event.preventDefault();
      }
    });
    card.addEventListener("dragstart", function (event) {
      dragged = card;
      event.dataTransfer.setData("text/plain", card.dataset.completionId);
      event.dataTransfer.effectAllowed = "move";
      card.classList.add("dragging");
    });
    card.addEventListener("dragend", function () {
      card.classList.remove("dragging");
      dragged = null;
    });
  });

  document.querySelectorAll(".rank-group").forEach(function (group) {
    group.addEventListener("dragover", function (event) {
      if (dragged) {
        event.preventDefault(); // this is what makes the group a drop target
        group.classList.add("over");
      }
    });
    group.addEventListener("dragleave", function () {
      group.classList.remove("over");
    });
    group.addEventListener("drop", function (event) {
      event.preventDefault();
      group.classList.remove("over");
      if (dragged) {
        setRank(dragged, group.dataset.rank ? Number(group.dataset.rank) : null, false);
      }
    });
  });

  form.addEventListener("submit", function (event) {
    const action = event.submitter ? event.submitter.value : "rank";
    if (action !== "rank") {
      if (!reason.value.trim()) {
        event.preventDefault();
        say("Say why in the Reason box first.");
        reason.focus();
      }
      return;
    }
    const missing = cards.filter(function (card) {
      return rankOf(card) === null;
    });
    if (missing.length > 0) {
      event.preventDefault();
      say("Rank every completion (" + missing.length + " not ranked yet); ties are allowed.");
      missing[0].focus();
    }
    // a second click sends the same submission id: the server stores the label once
  });
})();
